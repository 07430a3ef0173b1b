"""L2X (Chen et al., ICML 2018) and INVASE: amortised instance-wise feature selection."""

from zoo.l2x import model  # noqa: F401  (registers the family's models)

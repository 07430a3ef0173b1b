"""ReNN (Hu Wang, ICPR 2018), rule distillation and the semantic loss: rules embedded in networks."""

from zoo.renn import model  # noqa: F401  (registers the family's models)

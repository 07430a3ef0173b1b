"""Loss modules: ``forward(out, batch) -> dict[str, Tensor]`` of named terms that the System sums and logs."""

from losses.classification import ClassificationLoss
from losses.filter_part import FilterPartLoss

__all__ = ["ClassificationLoss", "FilterPartLoss"]

"""Loss modules: ``forward(out, batch) -> dict[str, Tensor]`` of named terms that the System sums and logs."""

from losses.classification import ClassificationLoss

__all__ = ["ClassificationLoss"]

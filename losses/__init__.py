"""Loss modules: ``forward(out, batch) -> dict[str, Tensor]`` of named terms that the System sums and logs."""

from losses.classification import ClassificationLoss
from losses.filter_part import FilterPartLoss
from losses.rules import LogicRuleDistillation, ReNNLoss, SemanticLoss
from losses.selection import INVASELoss, L2XLoss

__all__ = ["ClassificationLoss", "FilterPartLoss", "INVASELoss", "L2XLoss", "LogicRuleDistillation", "ReNNLoss",
           "SemanticLoss"]

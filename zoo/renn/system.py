"""Transitional: the family's System before its move onto ZooSystem."""

from zoo.engine.legacy import StagedSystem as ReNNSystem  # noqa: F401
from zoo.engine.legacy import ClassificationSystem as RuleLossSystem  # noqa: F401

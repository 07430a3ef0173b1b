"""Transitional: the family's System before its move onto ZooSystem."""

from zoo.engine.legacy import SelectorSystem as L2XSystem  # noqa: F401

"""Transitional: the family's System before its move onto ZooSystem."""

from zoo.engine.legacy import ExplanationSystem as TextualSystem  # noqa: F401

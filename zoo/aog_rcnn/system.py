"""Transitional: the family's System before its move onto ZooSystem."""

from zoo.engine.legacy import DetectionSystem as AOGRCNNSystem  # noqa: F401

"""Interpretable CNN (Zhang, Wu & Zhu, CVPR 2018): filters that each fire on one object part."""

from zoo.icnn import model  # noqa: F401  (registers the family's models)

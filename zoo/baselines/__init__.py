"""Opaque classifiers: the twins every interpretable family is compared with."""

from zoo.baselines import model  # noqa: F401  (registers the family's models)

"""Concept Bottleneck Models (Koh et al., ICML 2020), with Concept Embedding Models as a variant: image -> human
concepts (the bottleneck) -> label, so that a person can read and correct the concepts behind a prediction."""

from zoo.cbm import model  # noqa: F401  (registers the family's models)

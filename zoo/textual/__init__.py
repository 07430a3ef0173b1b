"""Textual explanation heads (Hendricks et al., ECCV 2016): sentences that justify a class."""

from zoo.textual import model  # noqa: F401  (registers the family's models)

"""ProtoPNet (Chen et al., NeurIPS 2019): classify by "this patch looks like that prototypical part" scores, each
prototype a latent patch of a real training image after push."""

from zoo.protopnet import model  # noqa: F401  (registers the family's models)

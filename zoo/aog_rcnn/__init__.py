"""AOG-parsed R-CNN (Wu et al. 2017/2019): detections explained by their best parse tree."""

from zoo.aog_rcnn import model  # noqa: F401  (registers the family's models)

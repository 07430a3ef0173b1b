"""Score every explainer of a model on one fixed batch: time, deletion/insertion AUC, pointing game, mass in parts."""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn as nn

from zoo.explain.captum import POSTHOC_METHODS, SELF_EXPLANATION, LogitsOnly, explain
from zoo.explain.faithfulness import AttributionInMask, DeletionAUC, InsertionAUC

DEFAULT_METHODS = (SELF_EXPLANATION, *POSTHOC_METHODS)


def score_explanations(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                       part_masks: torch.Tensor | None = None, methods: Sequence[str] = DEFAULT_METHODS,
                       step: int = 128) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """One row per method with its explanation time and faithfulness/ground-truth scores, and the maps.

    Methods a model cannot run (the class activation map and Grad-CAM on the head's input need a pooled head, timm's
    `forward_head`) are skipped.
    """
    was_training = model.training
    model.eval()
    logits_only = LogitsOnly(model)
    rows, maps = [], {}
    for method in methods:
        if method in (SELF_EXPLANATION, "layer_gradcam") and not hasattr(model, "forward_head"):
            continue  # both read the map a pooled head pools; a flattening head has none
        start = time.perf_counter()
        saliency = explain(model, images, target, method)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"method": method, "ms_per_sample": round(1e3 * seconds / len(images), 2)}
        for name, metric in (("deletion_auc", DeletionAUC(step=step)), ("insertion_auc", InsertionAUC(step=step))):
            metric.update(logits_only, images, saliency, target)
            row[name] = round(metric.compute().item(), 4)
        if part_masks is not None:
            for kind in ("pointing", "mass"):
                metric = AttributionInMask(kind)
                metric.update(saliency, part_masks)
                row[f"{kind}_in_parts"] = round(metric.compute().item(), 4)
        rows.append(row)
        maps[method] = saliency
    model.train(was_training)
    return rows, maps


def explain_validation_images(system: nn.Module, datamodule: Any, settings: dict[str, Any]
                              ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], torch.Tensor] | None:
    """Score `settings["methods"]` on the first `num_images` validation images of an image classifier System (the
    same images for every run of a comparison); None where the input is not an image batch."""
    dataset = datamodule.val_dataloader().dataset
    count = min(int(settings.get("num_images", 32)), len(dataset))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(count)])
    images = batch.get(system.input_key) if isinstance(batch, dict) else None
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        return None
    images = images.to(system.device)
    rows, maps = score_explanations(system.model, images, batch[system.target_key].to(system.device),
                                    batch.get("part_masks"), settings.get("methods", DEFAULT_METHODS),
                                    int(settings.get("step", 128)))
    return rows, maps, images

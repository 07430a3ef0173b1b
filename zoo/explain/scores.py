"""Score every explainer of a model on one fixed batch: time, deletion/insertion AUC, ROAD, infidelity (and, on request,
max-sensitivity), pointing game, mass in parts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torchmetrics import Metric
from tqdm.auto import tqdm

from zoo.figures import class_name, heatmap_overlay, new_figure
from zoo.explain.api import can_explain, own_explanation
from zoo.explain.captum import POSTHOC_METHODS, SELF_EXPLANATION, LogitsOnly, explain
from zoo.explain.faithfulness import AttributionInMask, DeletionAUC, Infidelity, InsertionAUC, SensitivityMax
from zoo.explain.road import RoadLeRF, RoadMoRF

DEFAULT_METHODS = (SELF_EXPLANATION, *POSTHOC_METHODS)
# faithfulness metrics of the report (`explain: {metrics: [...]}` of a compare spec), in column order. Max-sensitivity
# reruns each explainer 10 times (minutes for integrated gradients and occlusion on CPU): asked for, not default.
EXPLANATION_METRICS = ("deletion", "insertion", "road", "infidelity", "sensitivity")
DEFAULT_METRICS = ("deletion", "insertion", "road", "infidelity")
# which direction of each column of `score_explanations` is better (the report's legend), from the metrics themselves
EXPLANATION_DIRECTIONS: dict[str, bool | None] = {
    "ms_per_sample": False, "samples_per_s": True,
    "deletion_auc": DeletionAUC.higher_is_better, "insertion_auc": InsertionAUC.higher_is_better,
    "road_morf": RoadMoRF.higher_is_better, "road_lerf": RoadLeRF.higher_is_better,
    "infidelity": Infidelity.higher_is_better, "sensitivity_max": SensitivityMax.higher_is_better,
    "pointing_in_parts": AttributionInMask.higher_is_better, "mass_in_parts": AttributionInMask.higher_is_better,
}


def score_explanations(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                       part_masks: torch.Tensor | None = None, methods: Sequence[str] = DEFAULT_METHODS,
                       step: int = 128, metrics: Sequence[str] = DEFAULT_METRICS
                       ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """One row per method with its explanation time and faithfulness (`metrics`, of EXPLANATION_METRICS) and
    ground-truth scores, and the maps.

    Methods a model cannot run (`can_explain`: the self-explanation and Grad-CAM on the head's input need an own map or
    a pooled head) are skipped.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = sorted(set(metrics) - set(EXPLANATION_METRICS))
    if unknown:
        raise ValueError(f"Unknown explanation metrics {unknown}; choose from {EXPLANATION_METRICS}.")
    was_training = model.training
    model.eval()
    logits_only = LogitsOnly(model)
    rows, maps = [], {}
    progress = tqdm(methods, desc=f"explaining {len(images)} images", unit="method", leave=False)
    for method in progress:
        if not can_explain(model, method):
            continue
        progress.set_postfix_str(method)
        explainer = method_explainer(model, method)
        start = time.perf_counter()
        saliency = explainer(images, target)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"method": method, "ms_per_sample": round(1e3 * seconds / len(images), 2)}
        for name, metric in map_metrics(metrics, step).items():
            metric.update(logits_only, images, saliency, target)
            row[name] = rounded(name, metric.compute().item())
        if "sensitivity" in metrics:
            metric = SensitivityMax()
            metric.update(explainer, images, target)
            row["sensitivity_max"] = rounded("sensitivity_max", metric.compute().item())
        if part_masks is not None:
            for kind in ("pointing", "mass"):
                metric = AttributionInMask(kind)
                metric.update(saliency, part_masks)
                row[f"{kind}_in_parts"] = round(metric.compute().item(), 4)
        rows.append(row)
        maps[method] = saliency
    model.train(was_training)
    return rows, maps


def map_metrics(metrics: Sequence[str], step: int) -> dict[str, Metric]:
    """Report column -> a fresh metric, for those of `metrics` that score a map: update(model (logits out), images,
    saliency, target). Deletion/insertion take `step` pixels per step; ROAD gives two columns (MoRF, LeRF)."""
    columns = {"deletion": {"deletion_auc": DeletionAUC(step=step)},
               "insertion": {"insertion_auc": InsertionAUC(step=step)},
               "road": {"road_morf": RoadMoRF(), "road_lerf": RoadLeRF()},
               "infidelity": {"infidelity": Infidelity()}}
    return {column: metric for name in EXPLANATION_METRICS if name in metrics
            for column, metric in columns.get(name, {}).items()}


def rounded(column: str, value: float) -> float:
    """A report value: 4 decimals for scores in [0, 1], 4 significant digits for the unbounded infidelity (in squared
    logits) and max-sensitivity, which can be far below 1e-4."""
    return float(f"{value:.4g}") if column in ("infidelity", "sensitivity_max") else round(value, 4)


def method_explainer(model: nn.Module, method: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`method` as a function (images, target) -> (B, H, W) saliency: what the report times and scores, and what
    max-sensitivity reruns on perturbed images."""
    if method == SELF_EXPLANATION:
        return lambda images, target: self_explanation(model, images, target)
    return lambda images, target: explain(model, images, target, method)


def self_explanation(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The report's "cam" row: the model's own map (`zoo.explain.api.own_explanation`: its `own_explanation` where it
    has one, e.g. ProtoPNet's prototype evidence, else the class activation map of its pooled head), >= 0."""
    with torch.no_grad():
        return own_explanation(model, images, target).float().relu()


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
                                    int(settings.get("step", 128)), settings.get("metrics", DEFAULT_METRICS))
    return rows, maps, images


@dataclass
class ExplainedRun:
    """One model's explanations of the compared images: `maps` method -> (N, H, W) saliency over `images`
    (N, C, H, W); `true` / `predicted` class ids (N,) where known."""

    name: str
    images: torch.Tensor
    maps: dict[str, torch.Tensor]
    true: list[int] | None = None
    predicted: list[int] | None = None


def true_and_predicted(system: nn.Module, datamodule: Any, images: torch.Tensor
                       ) -> tuple[list[int] | None, list[int] | None]:
    """The true classes of the first `len(images)` validation samples (the ones `explain_validation_images` takes)
    and the model's predicted classes for `images` (None where the model gives no "logits")."""
    dataset = datamodule.val_dataloader().dataset
    target_key = getattr(system, "target_key", "label")
    samples = [dataset[i] for i in range(len(images))]
    true = [int(s[target_key]) for s in samples] if all(isinstance(s, dict) and target_key in s for s in samples) \
        else None
    was_training = system.training
    system.eval()
    with torch.no_grad():
        out = system.model(images)
    system.train(was_training)
    logits = out.get("logits") if isinstance(out, dict) else out
    predicted = logits.argmax(-1).tolist() if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None
    return true, predicted


def explanation_figure(runs: list[ExplainedRun], datamodule: Any = None) -> Any:
    """Every explained image (columns) under every model's explainers (rows named "<model>: <method>", red =
    important), the models stacked in one figure so one image is compared down its column. The top row shows the
    images with their true class; each model's first row says its predicted class (green right, red wrong)."""
    images = runs[0].images.float().cpu()
    rows = 1 + sum(len(run.maps) for run in runs)
    figure, axes = new_figure(rows, len(images))
    for column, image in enumerate(images):
        shown = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
        axes[0, column].imshow(shown.permute(1, 2, 0).clamp(0, 1).numpy())
        true = runs[0].true
        axes[0, column].set_title(f"true: {class_name(datamodule, true[column])}" if true else f"image {column}",
                                  fontsize=8)
    axes[0, 0].set_ylabel("image", fontsize=8, rotation=0, ha="right", va="center")
    row = 1
    for run in runs:
        panels = heatmap_overlay(images, torch.stack([m.float().cpu() for m in run.maps.values()]))  # (M, N, 3, H, W)
        for method, method_panels in zip(run.maps, panels):
            axes[row, 0].set_ylabel(f"{run.name}:\n{method}", fontsize=8, rotation=0, ha="right", va="center")
            for column, panel in enumerate(method_panels):
                axes[row, column].imshow(panel.permute(1, 2, 0).numpy())
                if method == next(iter(run.maps)) and run.predicted is not None:
                    right = run.true is None or run.true[column] == run.predicted[column]
                    axes[row, column].set_title(f"pred: {class_name(datamodule, run.predicted[column])}",
                                                fontsize=8, color="green" if right else "red")
            row += 1
    return figure

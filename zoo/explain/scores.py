"""Score every explainer of a model on one fixed batch: time, deletion/insertion AUC, ROAD, infidelity (and, on request,
max-sensitivity), pointing game, mass in parts; and the `random` reference map every model is scored with.

Deletion AUC and ROAD MoRF read the explained class's probability as pixels go: a confident model's probability falls
later whatever the map (a fixed random map deleted 0.450 on a tiny CNN at mean p(true class) 0.996, 0.225 on one at
0.726), so their raw values compare methods within one model, never models. Each model is therefore also scored with
a `random` map (uniform values, a function of the sample's dataset index and a fixed seed alone: the same image gets
the same map in any batch and for every model), and `deletion_vs_random` / `road_morf_vs_random` divide a method's
score by that model's random one (lower is better; 1 = no better than random): those compare across models.

The explained samples (`explained_indices`) are drawn once, class-stratified from a fixed seed, and every model and
every function of the stage (the scores, the figure's true classes) takes the same ones.

Series (B, C, T), e.g. ReNN and its 1-D CNN and LSTM twins on rule_series: every time step (all channels) is one
feature. Each model runs its own map where it has one (ReNN's strongest rule per step; the twins have none) and the
Captum feature methods (`FEATURE_METHODS`), plus the `random` row; deletion removes `step` time steps at a time
(`explain.step`, default `SERIES_STEP`) in saliency order, setting them to 0, which for rule_series is the raw
signal's flat baseline (its series are not normalised: beats are deviations from 0); the other faithfulness metrics
but max-sensitivity are image-only. The ground truth is the batch's `rule_events` (B, R, T): the steps where the rules
that decide the label are true (the premature beats that a pause or an interpolation makes evidence), widened by
`EVENT_TOLERANCE` steps each side (a premature beat's main lobe; an event is one peak step); a rule true at every step
of a series (frequent_premature of a bigeminy series) locates nothing and is left out, and a series without events
(class normal: its evidence is an absence) is left out of `pointing_in_events` / `mass_in_events`. No figure is
drawn for series.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import Metric
from tqdm.auto import tqdm

from zoo.figures import class_name, heatmap_overlay, new_figure
from zoo.explain.api import OWN, can_explain, own_explanation
from zoo.explain.api import explain as explain_features
from zoo.explain.captum import (FEATURE_METHODS, POSTHOC_METHODS, SELF_EXPLANATION, LogitsOnly, explain,
                                perturbation_samples)
from zoo.explain.faithfulness import AttributionInMask, DeletionAUC, Infidelity, InsertionAUC, SensitivityMax
from zoo.explain.road import RoadLeRF, RoadMoRF
from zoo.hashing import keyed_normal
from zoo.layers import eval_mode

DEFAULT_METHODS = (SELF_EXPLANATION, *POSTHOC_METHODS)
RANDOM_REFERENCE = "random"  # the reference row every model gets: a uniform random map per sample
# every method name an `explain: {methods: [...]}` block may hold: image models run the own map ("cam", or "own" as
# zoo.explain calls it) and POSTHOC_METHODS, feature selectors (L2X) FEATURE_METHODS; each family skips the others
KNOWN_METHODS = tuple(dict.fromkeys((SELF_EXPLANATION, OWN, RANDOM_REFERENCE, *POSTHOC_METHODS, *FEATURE_METHODS)))
# faithfulness metrics of the report (`explain: {metrics: [...]}` of a compare spec), in column order. Max-sensitivity
# reruns each explainer 10 times (minutes for integrated gradients and occlusion on CPU): asked for, not default.
EXPLANATION_METRICS = ("deletion", "insertion", "road", "infidelity", "sensitivity")
DEFAULT_METRICS = ("deletion", "insertion", "road", "infidelity")
# series (B, C, T): the default methods, the metrics that apply to time steps (the others are dropped), the deletion
# step (time steps per step of the curve) and how many steps around a rule event count as the event
SERIES_METHODS = (OWN, *FEATURE_METHODS)
SERIES_METRICS = ("deletion", "sensitivity")
SERIES_STEP = 4
# KernelShap / Lime on series: perturbations per series, over segments of `step` time steps (the unit deletion
# removes): with Captum's defaults (25 / 50 samples) over one feature per step their maps scored as a random map
SERIES_PERTURBATIONS = 1000
EVENT_TOLERANCE = 3
# the keys of a compare spec's `explain:` block (num_perturbed: L2X's perturbation count, `zoo.l2x.scores`)
EXPLAIN_KEYS = ("methods", "num_images", "step", "metrics", "num_perturbed")
EXPLAIN_SEED = 0  # which samples are explained, and the random reference maps
# column -> the raw column it divides by the model's random-map score: these compare models, the raw ones methods
VERSUS_RANDOM = {"deletion_vs_random": "deletion_auc", "road_morf_vs_random": "road_morf"}
# which direction of each column of `score_explanations` is better (the report's legend), from the metrics themselves
EXPLANATION_DIRECTIONS: dict[str, bool | None] = {
    "ms_per_sample": False, "samples_per_s": True,
    "deletion_auc": DeletionAUC.higher_is_better, "insertion_auc": InsertionAUC.higher_is_better,
    "road_morf": RoadMoRF.higher_is_better, "road_lerf": RoadLeRF.higher_is_better,
    "infidelity": Infidelity.higher_is_better, "sensitivity_max": SensitivityMax.higher_is_better,
    "pointing_in_parts": AttributionInMask.higher_is_better, "mass_in_parts": AttributionInMask.higher_is_better,
    "pointing_in_events": AttributionInMask.higher_is_better, "mass_in_events": AttributionInMask.higher_is_better,
    "deletion_vs_random": DeletionAUC.higher_is_better, "road_morf_vs_random": RoadMoRF.higher_is_better,
}
# what the report says under its explanation table: of image rows, and of series rows (the series sentence only
# where series rows are: an image-only table said it too)
EXPLANATION_NOTE = (
    "Every map explains the true class. Raw deletion_auc and road_morf compare methods within one model only (a more "
    "confident model keeps its probability longer whatever the map); deletion_vs_random and road_morf_vs_random "
    "(the score over the same model's `random` map's: 1 = no better than random) compare across models.")


def series_note(step: int = SERIES_STEP) -> str:
    """The note under series rows whose deletion set `step` time steps at a time (the `explain.step` the run used:
    a fixed SERIES_STEP in the note said 4 under rows deleted 16 at a time)."""
    return (f"{EXPLANATION_NOTE} Series: deletion sets {step} time step{'s' if step != 1 else ''} at a time to 0 (the "
            f"raw signal's baseline); *_in_events score the time steps of the true rule events (+-{EVENT_TOLERANCE} "
            f"steps) of the series that have any.")


SERIES_NOTE = series_note()  # the note of the default step


class ExplanationRows(list):
    """The rows of a System's `explanation_report` (a list of row dicts, one per method) with the `note` the report
    prints under its explanation table (what the rows' columns mean and which class they explain) and the
    `directions` of its legend (column -> whether higher is better, None: neither). A family whose explainers
    explain or score otherwise than `score_explanations` (L2X: the black box's predicted class and its own columns,
    `zoo.l2x.scores`) returns its rows with its own note and directions; the engine holds no family's note or
    columns. A plain list is taken as rows of `EXPLANATION_NOTE` and `EXPLANATION_DIRECTIONS` (`explanation_note`,
    `explanation_directions`)."""

    def __init__(self, rows: Sequence[dict[str, Any]] = (), note: str = EXPLANATION_NOTE,
                 directions: dict[str, bool | None] | None = None) -> None:
        super().__init__(rows)
        self.note = note
        self.directions = dict(EXPLANATION_DIRECTIONS if directions is None else directions)


def explanation_note(rows: Sequence[dict[str, Any]]) -> str:
    """The note under the explanation table of `rows` (an `explanation_report`'s rows): their own `note`
    (`ExplanationRows`), else `EXPLANATION_NOTE`, the note of `score_explanations`' columns."""
    return getattr(rows, "note", EXPLANATION_NOTE)


def explanation_directions(rows: Sequence[dict[str, Any]]) -> dict[str, bool | None]:
    """Which direction of each column of `rows` (an `explanation_report`'s rows) is better, for the report's legend:
    their own `directions` (`ExplanationRows`: a family's columns, L2X's `mean_rank` had none), else
    `EXPLANATION_DIRECTIONS`, the directions of `score_explanations`' columns."""
    return getattr(rows, "directions", EXPLANATION_DIRECTIONS)


def score_explanations(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                       part_masks: torch.Tensor | None = None, methods: Sequence[str] = DEFAULT_METHODS,
                       step: int = 128, metrics: Sequence[str] = DEFAULT_METRICS, keys: torch.Tensor | None = None,
                       truth: str = "parts") -> tuple[ExplanationRows, dict[str, torch.Tensor]]:
    """One row per method with its explanation time and faithfulness (`metrics`, of EXPLANATION_METRICS) and
    ground-truth scores, and the maps; then the `random` reference row (`random_maps` of `keys`, the samples'
    dataset indices, default 0..B-1; not in the maps) and, with deletion or ROAD, each row's `*_vs_random` columns
    (`VERSUS_RANDOM`: its score over the random row's, the columns that compare models). The rows are
    `ExplanationRows` noted `EXPLANATION_NOTE` (what a report says under them; `series_note(step)` for series). Scores
    are kept in full precision (the CSVs keep them; the markdown rounds them for reading, `zoo.cli.report.cell`).

    Methods a model cannot run (`can_explain`: the self-explanation and Grad-CAM on the head's input need an own map or
    a pooled head) are skipped, as are the feature methods that explain vectors and tokens only (`FEATURE_METHODS`
    less `POSTHOC_METHODS`: an `explain:` block shared by an L2X run and image runs names both). "own" is "cam".
    Max-sensitivity is not given for the random row: its map does not depend on the image (it would score 0).

    Series `images` (B, C, T) (module docstring): the methods are the own map (the row "own"; "cam" is taken as it)
    and `FEATURE_METHODS`, the others skipped; the metrics those of `SERIES_METRICS`, the others dropped; maps are
    (B, T). `part_masks` (B, P, H, W) or (B, P, T) bool give the columns `pointing_in_<truth>` / `mass_in_<truth>`;
    for series a sample whose masks are empty is left out of them (`AttributionInMask(skip_empty=True)`).
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = sorted(set(metrics) - set(EXPLANATION_METRICS))
    if unknown:
        raise ValueError(f"Unknown explanation metrics {unknown}; choose from {EXPLANATION_METRICS}.")
    series = images.ndim == 3
    own = OWN if series else SELF_EXPLANATION
    runnable, other = (FEATURE_METHODS, POSTHOC_METHODS) if series else (POSTHOC_METHODS, FEATURE_METHODS)
    metrics = tuple(metric for metric in metrics if not series or metric in SERIES_METRICS)
    methods = [own if method in (OWN, SELF_EXPLANATION) else method for method in methods]
    named = [(method, perturbation_samples(method)[0]) for method in dict.fromkeys(methods)]  # "lime:5000" -> lime
    methods = [method for method, name in named if method != RANDOM_REFERENCE and (name in runnable or
                                                                                   name not in other)]
    keys = torch.arange(len(images), device=images.device) if keys is None else keys.to(images.device)
    logits_only = LogitsOnly(model)
    rows, maps, raw = [], {}, {}
    progress = tqdm([*methods, RANDOM_REFERENCE], desc=f"explaining {len(images)} images", unit="method",
                    leave=False)
    with eval_mode(model):  # every module's train flag restored after, also when an explainer fails
        for method in progress:
            if method != RANDOM_REFERENCE and not can_explain(model, method):
                continue
            progress.set_postfix_str(method)
            explainer = random_explainer(keys) if method == RANDOM_REFERENCE else method_explainer(model, method, step)
            saliency, seconds = wall_time(partial(explainer, images, target), device=images.device,
                                          warm_up=partial(explainer, images[:1], target[:1]))
            row: dict[str, Any] = {"method": method, "ms_per_sample": 1e3 * seconds / len(images)}
            raw[method] = {}
            for name, metric in map_metrics(metrics, step).items():
                metric.update(logits_only, images, saliency, target)
                raw[method][name] = row[name] = metric.compute().item()
            if "sensitivity" in metrics and method != RANDOM_REFERENCE:
                metric = SensitivityMax()
                metric.update(explainer, images, target)
                row["sensitivity_max"] = metric.compute().item()
            if part_masks is not None:
                for kind in ("pointing", "mass"):
                    metric = AttributionInMask(kind, skip_empty=series)
                    metric.update(saliency, part_masks.to(saliency.device))
                    row[f"{kind}_in_{truth}"] = metric.compute().item()
            rows.append(row)
            if method != RANDOM_REFERENCE:
                maps[method] = saliency
    for row in rows:
        for column, score in VERSUS_RANDOM.items():
            if score in raw[RANDOM_REFERENCE]:
                reference = raw[RANDOM_REFERENCE][score]
                row[column] = raw[row["method"]][score] / reference if reference > 0 else math.nan
    return ExplanationRows(rows, series_note(step) if series else EXPLANATION_NOTE), maps  # the note of these columns


def random_explainer(keys: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `random` reference as an explainer (images, target) -> `random_maps` of the samples' `keys` (B,), one
    value per position: (B, H, W) for images, (B, T) for series."""
    return lambda images, target: random_maps(keys[:len(images)], images.shape[2:])


def random_maps(keys: torch.Tensor, size: Sequence[int], seed: int = EXPLAIN_SEED) -> torch.Tensor:
    """The `random` reference maps (B, *size), e.g. (B, H, W) or (B, T): values uniform in (0, 1), row b a function
    of (`seed`, `keys[b]`) alone (`zoo.hashing.keyed_normal` through the normal CDF), so a sample (its dataset index
    as key) gets the same map in any batch, on any device and for every model. keys: (B,) integers."""
    normal = keyed_normal(keys, tuple(size), seed)  # (B, *size)
    return 0.5 * (1 + torch.erf(normal / math.sqrt(2)))


def wall_time(function: Callable[[], Any], repeats: int = 1, warmup: int = 1, device: torch.device | None = None,
              warm_up: Callable[[], Any] | None = None) -> tuple[Any, float]:
    """`function()` and the median of `repeats` timed calls, in seconds, after `warmup` untimed calls of `warm_up`
    (default `function` itself; e.g. the method on one image: it pays the one-time costs, kernels loaded and handles
    made, at a fraction of the batch's). On CUDA the device is synchronised before the clock starts and before it
    stops, so the work is timed, not the launches; on the CPU nothing is synchronised. L2X's race times with it too
    (`zoo.l2x.scores`); benchmarks pass their own timer (`benchmarks.timing`)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        (warm_up or function)()
    seconds, result = [], None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = function()
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def check_explain_settings(settings: dict[str, Any]) -> None:
    """Raise a ValueError that names the mistake (with the close names) unless `settings`, a compare spec's
    `explain:` block, holds only EXPLAIN_KEYS, methods of KNOWN_METHODS, metrics of EXPLANATION_METRICS and
    counts >= 1: compare checks it before any run trains."""
    from zoo.checks import close_names

    def did_you_mean(name: Any, names: Sequence[str]) -> str:
        close = close_names(str(name), list(names))
        return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""

    if not isinstance(settings, dict):
        raise TypeError(f"compare spec: explain must be a mapping of {EXPLAIN_KEYS}; got {settings!r}.")
    for key in settings:
        if key not in EXPLAIN_KEYS:
            raise ValueError(f"compare spec: explain has no key {key!r}{did_you_mean(key, EXPLAIN_KEYS)}; "
                             f"keys: {', '.join(EXPLAIN_KEYS)}.")
    for key, known in (("methods", KNOWN_METHODS), ("metrics", EXPLANATION_METRICS)):
        names = settings.get(key, [])
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise TypeError(f"compare spec: explain.{key} must be a list of names of {known}; got {names!r}.")
        for name in names:
            if key == "methods" and isinstance(name, str) and ":" in name:
                name = perturbation_samples(name)[0]  # "lime:5000": a sample count, checked there
            if name not in known:
                raise ValueError(f"compare spec: explain.{key} names {name!r}, which does not exist"
                                 f"{did_you_mean(name, known)}; choose from {', '.join(known)}.")
    for key in ("num_images", "step", "num_perturbed"):
        value = settings.get(key, 1)
        if key == "num_perturbed" and value is None:  # L2X's default count
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"compare spec: explain.{key} must be a whole number >= 1; got {value!r}.")


def map_metrics(metrics: Sequence[str], step: int) -> dict[str, Metric]:
    """Report column -> a fresh metric, for those of `metrics` that score a map: update(model (logits out), images,
    saliency, target). Deletion/insertion take `step` pixels per step; ROAD gives two columns (MoRF, LeRF)."""
    columns = {"deletion": {"deletion_auc": DeletionAUC(step=step)},
               "insertion": {"insertion_auc": InsertionAUC(step=step)},
               "road": {"road_morf": RoadMoRF(), "road_lerf": RoadLeRF()},
               "infidelity": {"infidelity": Infidelity()}}
    return {column: metric for name in EXPLANATION_METRICS if name in metrics
            for column, metric in columns.get(name, {}).items()}


def method_explainer(model: nn.Module, method: str, step: int = SERIES_STEP
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`method` as a function (images, target) -> (B, H, W) saliency ((B, T) for series): what the report times and
    scores, and what max-sensitivity reruns on perturbed inputs. Series take `zoo.explain.api.explain`: gradient
    methods score every time step; KernelShap and Lime perturb segments of `step` steps (what deletion removes at a
    time) with `SERIES_PERTURBATIONS` samples, or the count the name carries ("lime:5000")."""
    if method in (SELF_EXPLANATION, OWN):
        return lambda images, target: self_explanation(model, images, target)
    name, n_samples = perturbation_samples(method)

    def explainer(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if inputs.ndim == 4:
            return explain(model, inputs, target, name)
        if inputs.ndim == 3:
            return explain_features(model, inputs, name, target, n_samples or SERIES_PERTURBATIONS, step)
        return explain_features(model, inputs, name, target, n_samples)
    return explainer


def self_explanation(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The report's "cam" row: the model's own map (`zoo.explain.api.own_explanation`: its `own_explanation` where it
    has one, e.g. ProtoPNet's prototype evidence, else the class activation map of its pooled head), >= 0."""
    with torch.no_grad():
        return own_explanation(model, images, target).float().relu()


def explained_indices(dataset: Any, count: int, target_key: str = "label", seed: int = EXPLAIN_SEED) -> torch.Tensor:
    """The dataset indices (count,) of the samples the explanation stage explains, the same for every model: a
    round-robin over the classes in a permutation seeded with `seed` (the permutation's first sample of each class,
    then its second of each, ...), so a class-sorted split (an ImageFolder, CUB's test images) gives every class its
    share instead of its first one or two classes. The labels are read without loading images where the dataset
    holds them (`dataset_labels`); elsewhere the seeded permutation's first `count` samples."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))  # (N,)
    labels = dataset_labels(dataset, target_key)
    if labels is None:
        return order[:count]
    labels = labels[order]  # (N,) in permutation order
    by_label = labels.argsort(stable=True)  # permutation positions grouped by label, in permutation order
    sorted_labels = labels[by_label]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)  # each group's first position
    turn = torch.empty_like(by_label).scatter_(0, by_label, torch.arange(len(labels)) - starts)  # k-th of its class
    return order[turn.argsort(stable=True)[:count]]


def dataset_labels(dataset: Any, target_key: str = "label") -> torch.Tensor | None:
    """Every sample's class id (N,) read from what the dataset holds, without loading its images: a tensor dataset's
    `tensors[target_key]`, a `targets` / `labels` sequence (torchvision, IDX), an ImageFolder's `folder.targets`,
    CUB's `index.labels[rows]`; through wrappers with a `dataset` (normalisation) and `indices` (a Subset). None
    where the dataset holds none of these."""
    indices = getattr(dataset, "indices", None)
    if hasattr(dataset, "dataset") and isinstance(dataset.dataset, torch.utils.data.Dataset):
        labels = dataset_labels(dataset.dataset, target_key)
        return None if labels is None else labels[torch.as_tensor(indices)] if indices is not None else labels
    tensors = getattr(dataset, "tensors", None)
    candidates = [tensors.get(target_key) if isinstance(tensors, dict) else None, getattr(dataset, "targets", None),
                  getattr(dataset, "labels", None), getattr(getattr(dataset, "folder", None), "targets", None)]
    index, rows = getattr(dataset, "index", None), getattr(dataset, "rows", None)
    if index is not None and rows is not None and getattr(index, "labels", None) is not None:
        candidates.append(torch.as_tensor(index.labels)[torch.as_tensor(rows)])
    for labels in candidates:
        if labels is not None and len(labels) == len(dataset):
            labels = torch.as_tensor(labels)
            if labels.ndim == 1 and not labels.is_floating_point():
                return labels.long()
    return None


def explained_batch(system: nn.Module, datamodule: Any, count: int) -> tuple[torch.Tensor, Any]:
    """The indices (`explained_indices`) and the collated batch of the validation samples the stage explains."""
    dataset = datamodule.val_dataloader().dataset
    indices = explained_indices(dataset, min(count, len(dataset)), getattr(system, "target_key", "label"))
    return indices, torch.utils.data.default_collate([dataset[int(i)] for i in indices])


def explain_validation_images(system: nn.Module, datamodule: Any, settings: dict[str, Any]
                              ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], torch.Tensor] | None:
    """Score `settings["methods"]` on `num_images` validation images of an image classifier System, drawn once and
    class-stratified (`explained_indices`: the same images for every run of a comparison), each explained for its
    true class. Series (B, C, T) take the series branch (module docstring; `explain_validation_series`). None where
    the input is neither images nor series."""
    indices, batch = explained_batch(system, datamodule, int(settings.get("num_images", 32)))
    images = batch.get(system.input_key) if isinstance(batch, dict) else None
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or not images.is_floating_point():
        return None
    if images.ndim == 3:
        return explain_validation_series(system, batch, indices, settings)
    images = images.to(system.device)
    rows, maps = score_explanations(system.model, model_input(system, images),
                                    batch[system.target_key].to(system.device), batch.get("part_masks"),
                                    settings.get("methods", DEFAULT_METHODS), int(settings.get("step", 128)),
                                    settings.get("metrics", DEFAULT_METRICS), keys=indices)
    return rows, {method: saliency.float() for method, saliency in maps.items()}, images  # float32, as the images


def model_input(system: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Float `inputs` on the System's device in the dtype its model computes in, the first float parameter's: a run
    under `--trainer.precision=64-true` (or bf16-true / 16-true) holds a float64 (bfloat16, float16) model, and the
    loaded float32 images were refused by its input check after the run had trained ("expects images of dtype
    torch.float64"). The trainer's own batches reach the model through its precision plugin's `convert_input`, which
    gives the same dtype; mixed precision keeps float32 parameters, so nothing changes there."""
    inputs = inputs.to(system.device)
    dtype = next((parameter.dtype for parameter in system.model.parameters() if parameter.is_floating_point()), None)
    return inputs.to(dtype) if dtype is not None and inputs.is_floating_point() else inputs


def explain_validation_series(system: nn.Module, batch: dict[str, Any], indices: torch.Tensor,
                              settings: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor],
                                                                 torch.Tensor]:
    """`explain_validation_images` of series (B, C, T) (module docstring): `settings["methods"]` (default
    `SERIES_METHODS`) scored for the true class with deletion over time steps (`step`, default `SERIES_STEP`) and the
    ground truth of `rule_event_masks` (the System's `rule_events_key`, default "rule_events"; none where the batch
    has no rule events). The maps are not returned ({}): the figure draws images."""
    series = batch[system.input_key].to(system.device)  # (B, C, T)
    events = batch.get(getattr(system, "rule_events_key", "rule_events"))
    target = batch[system.target_key].to(system.device)
    rows, _ = score_explanations(system.model, model_input(system, series), target,
                                 None if events is None else rule_event_masks(events),
                                 settings.get("methods", SERIES_METHODS), int(settings.get("step", SERIES_STEP)),
                                 settings.get("metrics", DEFAULT_METRICS), keys=indices, truth="events")
    return rows, {}, series


def rule_event_masks(events: torch.Tensor, tolerance: int = EVENT_TOLERANCE) -> torch.Tensor:
    """Where the evidence for a series' label is: (B, R, T) rule events (> 0.5 = the rule is true at that step) ->
    (B, R, T) bool, each event widened by `tolerance` steps each side; a rule true at every step of a series (a
    property of the whole series, e.g. frequent_premature) locates nothing and gives an empty row."""
    fired = events > 0.5  # (B, R, T)
    located = fired & ~fired.all(-1, keepdim=True)
    return F.max_pool1d(located.float(), 2 * tolerance + 1, stride=1, padding=tolerance) > 0  # (B, R, T)


@dataclass
class ExplainedRun:
    """One model's explanations of the compared images: `maps` method -> (N, H, W) saliency over `images`
    (N, C, H, W); `true` / `predicted` class ids (N,) where known. `explained`: the class ids (N,) the maps explain
    where that is not the true class, named by `explains` (L2X: its black box's prediction, "black box pred"); None:
    the maps explain the true class (`score_explanations`)."""

    name: str
    images: torch.Tensor
    maps: dict[str, torch.Tensor]
    true: list[int] | None = None
    predicted: list[int] | None = None
    explained: list[int] | None = None
    explains: str = "true class"


def explained_run(name: str, system: nn.Module, datamodule: Any, images: torch.Tensor,
                  maps: dict[str, torch.Tensor]) -> ExplainedRun:
    """The `ExplainedRun` of a System's `explanation_report` (`maps` of `images`): the true and predicted classes
    (`true_and_predicted`) and, where the System's maps explain another class than the true one, that class, from
    its `explained_classes(images) -> (what it is, class ids (N,))` (L2X: its black box's predicted class). The figure
    wrote "maps explain the true class" and the approximator's "pred:" above maps of L2X's black box's prediction."""
    true, predicted = true_and_predicted(system, datamodule, images)
    explained_classes = getattr(system, "explained_classes", None)
    if explained_classes is None:  # the maps explain the true class
        return ExplainedRun(name, images, maps, true, predicted)
    explains, explained = explained_classes(images)
    return ExplainedRun(name, images, maps, true, predicted, explained, explains)


def true_and_predicted(system: nn.Module, datamodule: Any, images: torch.Tensor
                       ) -> tuple[list[int] | None, list[int] | None]:
    """The true classes of the `len(images)` validation samples `explain_validation_images` takes (the same
    `explained_indices`; None where `images` are not those samples, e.g. a System that picks its own) and the
    model's predicted classes for `images` (None where the model gives no "logits")."""
    target_key, input_key = getattr(system, "target_key", "label"), getattr(system, "input_key", "image")
    _, batch = explained_batch(system, datamodule, len(images))
    labels = batch.get(target_key) if isinstance(batch, dict) else None
    loaded = batch.get(input_key) if isinstance(batch, dict) else None
    same = isinstance(loaded, torch.Tensor) and loaded.shape == images.shape and \
        torch.allclose(loaded.float(), images.detach().float().cpu(), atol=1e-3)
    true = labels.tolist() if same and isinstance(labels, torch.Tensor) and labels.ndim == 1 else None
    was_training = system.training
    system.eval()
    with torch.no_grad():
        out = system.model(model_input(system, images))  # the model's dtype (`model_input`)
    system.train(was_training)
    logits = out.get("logits") if isinstance(out, dict) else out
    predicted = logits.argmax(-1).tolist() if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None
    return true, predicted


def explanation_figure(runs: list[ExplainedRun], datamodule: Any = None) -> Any:
    """Every explained image (columns) under every model's explainers (rows named "<model>: <method>", red =
    important), the models stacked in one figure so one image is compared down its column. The top row shows the
    images (the datamodule's normalisation undone, `denormalize`) with their true class, the class the maps explain;
    each model's first row says its predicted class (green right, red wrong). A model whose maps explain another class
    (`ExplainedRun.explained`: L2X, its black box's prediction) says that class there instead, "<explains>: <class>"
    (green where it is the true class), and the title says which models' maps explain what."""
    images = runs[0].images.float().cpu()
    images = getattr(datamodule, "denormalize", lambda x: x)(images).clamp(0, 1)  # pixels as they are, in [0, 1]
    rows = 1 + sum(len(run.maps) for run in runs)
    figure, axes = new_figure(rows, len(images))
    true = runs[0].true
    figure.suptitle(explained_title(runs, true is not None), fontsize=9)
    for column, image in enumerate(images):
        shown = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
        axes[0, column].imshow(shown.permute(1, 2, 0).numpy())
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
                said = ("pred", run.predicted) if run.explained is None else (run.explains, run.explained)
                if method == next(iter(run.maps)) and said[1] is not None:  # the model's first row
                    right = run.true is None or run.true[column] == said[1][column]
                    axes[row, column].set_title(f"{said[0]}: {class_name(datamodule, said[1][column])}",
                                                fontsize=8, color="green" if right else "red")
            row += 1
    return figure


def explained_title(runs: list[ExplainedRun], true_known: bool) -> str:
    """The explanation figure's title: which class the maps explain. Where every model's maps explain the true class,
    one sentence for all; else one for each group of models, in their order (L2X beside its black box twin:
    "l2x: maps explain the black box pred (above its first row); black_box: maps explain the true class ...")."""
    true_class = "maps explain the true class" + (" (top row); pred: the model's prediction" if true_known else "")
    if all(run.explained is None for run in runs):
        return true_class
    groups: dict[str, list[str]] = {}  # what the maps explain -> the models whose maps explain it
    for run in runs:
        said = true_class if run.explained is None else f"maps explain the {run.explains} (above its first row)"
        groups.setdefault(said, []).append(run.name)
    return "; ".join(f"{', '.join(names)}: {said.replace('; ', ', ')}" for said, names in groups.items())

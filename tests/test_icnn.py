"""Interpretable CNN: templates, mask, filter loss and its statistics against slow float64 references; location
instability and part IoU against slow references and hand-built maps."""

from __future__ import annotations

import math
from functools import partial
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from losses.baselines import ClassificationLoss
from losses.icnn import FilterPartLoss
from losses.icnn import filter_mutual_information, log_template_prior
from zoo.icnn.metrics import LocationInstability, PartIoU
from zoo.icnn.ops import log_mean_exp_over_batch, part_mask, template_bank, template_scores
from zoo.icnn.system import ICNNSystem


def reference_templates(h: int, w: int, beta: float = 4.0) -> list[np.ndarray]:
    n, tau = max(h, w), 0.5 / max(h, w) ** 2
    templates = []
    for a in range(h):
        for b in range(w):
            t = np.zeros((h, w))
            for i in range(h):
                for j in range(w):
                    t[i, j] = tau * max(1 - beta * (abs(i - a) + abs(j - b)) / n, -1)
            templates.append(t)
    templates.append(np.full((h, w), -tau))
    return templates


def reference_mi(x: torch.Tensor, labels: torch.Tensor, category: torch.Tensor, running: torch.Tensor | None,
                 m: float) -> torch.Tensor:
    """Label-aware -MI terms of the FilterPartLoss docstring, written out with loops in float64."""
    batch, filters, h, w = x.shape
    templates = [torch.tensor(t) for t in reference_templates(h, w)]
    alpha = h * w / (1 + h * w)
    prior = [alpha / (h * w)] * (h * w) + [1 - alpha]
    out = []
    for f in range(filters):
        tr = [[(x[b, f] * t).sum() for t in templates] for b in range(batch)]
        z = []
        for t in range(len(templates)):
            batch_mean = sum(torch.exp(tr[b][t]) for b in range(batch)) / batch
            mean = batch_mean if running is None else (1 - m) * math.exp(running[f, t]) + m * batch_mean
            z.append(batch * mean)
        total = 0.0
        for b in range(batch):
            p_given = [torch.exp(tr[b][t]) / z[t] for t in range(len(templates))]
            p_x = sum(prior[t] * p_given[t] for t in range(len(templates)))
            support = range(h * w) if labels[b] == category[f] else [h * w]
            total = total + sum(prior[t] * p_given[t] * torch.log(p_given[t] / p_x) for t in support)
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("h, w", [(4, 4), (5, 5), (3, 5)])
def test_templates_match_the_slow_loop(h: int, w: int) -> None:
    bank = template_bank(h, w)
    expected = torch.tensor(np.stack([t.ravel() for t in reference_templates(h, w)]), dtype=torch.float32)
    assert bank.shape == (h * w + 1, h * w) and torch.allclose(bank, expected)
    assert len({tuple(row.tolist()) for row in bank[:-1]}) == h * w  # n^2 distinct positives, none all-zero
    assert (bank[:-1].abs().sum(1) > 0).all()


@pytest.mark.parametrize("with_running", [False, True])
def test_mutual_information_value_and_gradient_match_float64_reference(with_running: bool) -> None:
    torch.manual_seed(0)
    x = (torch.rand(6, 3, 4, 4, dtype=torch.float64) * 30).requires_grad_()
    labels, category = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 2, 1])
    running = torch.randn(3, 17, dtype=torch.float64) if with_running else None
    m = 0.3
    scores = template_scores(x, template_bank(4, 4).double())
    batch_z = log_mean_exp_over_batch(scores)
    log_mean_z = batch_z if running is None else torch.logaddexp(math.log(1 - m) + running, math.log(m) + batch_z)
    mi = filter_mutual_information(scores, labels[:, None] == category, log_template_prior(16).double(), log_mean_z)
    reference = reference_mi(x, labels, category, running, m)
    assert torch.allclose(mi, reference, rtol=1e-6)
    grad, = torch.autograd.grad(mi.sum(), x)
    ref_grad, = torch.autograd.grad(reference.sum(), x)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-10)


def test_gradient_direction_matches_paper_eq4() -> None:
    """Eq. 4: (p(T^)/Z) t^ e^{tr(x.T^)} {tr - log Z - log p(x)}, T^ = T_mu^ for the filter's category, else T-.
    That expression is dMI/dx (the direction descent on Loss_f = -MI moves x); the exact gradient agrees."""
    torch.manual_seed(1)
    batch, h, w = 64, 4, 4
    labels = torch.arange(batch) % 2
    x = torch.rand(batch, 1, h, w) * 20
    x.view(batch, -1)[torch.arange(batch), torch.randint(h * w, (batch,))] += 100 * (labels == 0)
    x.requires_grad_()
    bank, prior = template_bank(h, w), log_template_prior(h * w)
    scores = template_scores(x, bank)
    log_mean_z = log_mean_exp_over_batch(scores).detach()  # Eq. 4 treats Z_T as a constant
    mi = filter_mutual_information(scores, (labels == 0)[:, None], prior, log_mean_z)
    grad, = torch.autograd.grad(mi.sum(), x)
    with torch.no_grad():
        log_p_given = scores - math.log(batch) - log_mean_z  # (B, 1, T)
        log_p_x = torch.logsumexp(prior + log_p_given, -1)  # (B, 1)
        t_hat = torch.where(labels[:, None] == 0, x.flatten(2).argmax(-1), torch.full((batch, 1), h * w))
        log_p_hat = log_p_given.gather(-1, t_hat[..., None])[..., 0]
        eq4 = (prior[t_hat] + log_p_hat).exp()[..., None] * bank[t_hat] * (log_p_hat - log_p_x)[..., None]
    assert torch.nn.functional.cosine_similarity(grad.flatten(), eq4.flatten(), 0) > 0.95


def test_part_mask_argmax_and_centroid() -> None:
    x = torch.zeros(1, 2, 5, 5)
    x[0, 0, 1, 3] = 2.0
    x[0, 1, 2, 1] = x[0, 1, 2, 3] = 1.0  # centroid (2, 2), argmax the first maximum (2, 1)
    mask = part_mask(x, beta=4.0)
    expected = torch.tensor([[max(1 - 4 * (abs(i - 1) + abs(j - 3)) / 5, -1) for j in range(5)] for i in range(5)])
    assert torch.allclose(mask[0, 0], expected)
    centroid = part_mask(x, beta=4.0, mu="centroid")[0, 1]
    assert centroid[2, 2] == 1 and centroid.argmax() == 12
    with pytest.raises(ValueError, match="mu must be one of"):
        part_mask(x, mu="median")


def test_lambda_zero_gives_exactly_the_opaque_twin_gradients() -> None:
    torch.manual_seed(0)
    batch = {"image": torch.rand(8, 3, 64, 64), "label": torch.arange(8) % 6}

    def gradients(loss: torch.nn.Module) -> list[torch.Tensor]:
        torch.manual_seed(3)
        system = ICNNSystem("icnn_tinycnn", num_classes=6, loss=loss)
        system.training_step = partial(ICNNSystem.training_step, system)  # no trainer attached
        system.log = lambda *a, **k: None  # type: ignore[method-assign]
        system.training_step(batch, 0).backward()
        return [p.grad.clone() for p in system.parameters() if p.grad is not None]

    twin = gradients(FilterPartLoss(weight=0.0))
    task_only = gradients(ClassificationLoss())
    interpretable = gradients(FilterPartLoss(weight=1.0))
    assert len(twin) == len(task_only) and all(torch.equal(a, b) for a, b in zip(twin, task_only))
    assert not all(torch.equal(a, b) for a, b in zip(interpretable, task_only))


def test_masks_off_gives_ordinary_conv_layers_with_the_same_weights() -> None:
    """The paper's baseline: the same network with ordinary top layers. Same weights, masks off: the head reads
    the unmasked ReLU maps of the added layer, which are the masked model's pre-mask maps."""
    torch.manual_seed(0)
    masked = zoo.create_model("icnn_tinycnn", num_classes=6, image_size=64)
    ordinary = zoo.create_model("icnn_tinycnn", num_classes=6, image_size=64, masks=False)
    ordinary.load_state_dict(masked.state_dict())
    images = torch.rand(4, 3, 64, 64)
    masked.eval(), ordinary.eval()
    out, plain = masked(images), ordinary(images)
    assert torch.equal(plain["masked_filter_maps"], plain["filter_maps"])
    assert not torch.equal(out["masked_filter_maps"], out["filter_maps"])  # masks zero what lies far from the peak
    # the top layer's unmasked output feeds the added conv, so from there on the two models differ
    top = F.relu(ordinary.backbone(images)[-1])
    expected = F.relu(ordinary.added_conv(top))
    torch.testing.assert_close(plain["filter_maps"], expected)
    torch.testing.assert_close(plain["logits"], ordinary.head(expected))


@pytest.mark.filterwarnings("ignore:InterpretableCNN.*update_statistics")  # forwards for their values, no training
def test_no_nan_with_large_activations_and_under_bf16() -> None:
    torch.manual_seed(0)
    model = zoo.create_model("icnn_tinycnn", num_classes=6)
    loss = FilterPartLoss()
    batch = {"image": torch.rand(4, 3, 64, 64) * 1e4, "label": torch.tensor([0, 1, 2, 3])}
    terms = loss(model(batch["image"]), batch)  # first step: the running Z_T is still unset (NaN)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    huge = (torch.rand(4, 2, 5, 5, dtype=torch.float32) * 1e6).requires_grad_()  # scores ~ 1e4: exp overflows
    scores = template_scores(huge, template_bank(5, 5))
    mi = filter_mutual_information(scores, torch.ones(4, 2, dtype=torch.bool), log_template_prior(25),
                                   log_mean_exp_over_batch(scores))
    mi.sum().backward()
    assert torch.isfinite(mi).all() and torch.isfinite(huge.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch["image"] / 1e4)
        terms = loss(out, batch)
    assert out["features"].dtype == torch.bfloat16 and all(torch.isfinite(v) for v in terms.values())


def test_categories_follow_the_strongest_class_and_only_in_training() -> None:
    model = zoo.create_model("icnn_tinycnn", num_classes=3)
    layer = model.added_filters
    raw = torch.zeros(6, layer.beta.numel(), 8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    raw[labels == 2, 0, 3, 3] = 5.0  # filter 0 fires on class 2
    raw[labels == 1, 1, 4, 4] = 5.0  # filter 1 fires on class 1
    layer.update_statistics(raw, torch.zeros(layer.log_mean_z.shape), labels)
    assert layer.filter_category[:2].tolist() == [2, 1]
    assert torch.isfinite(layer.log_mean_z).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    system = ICNNSystem("icnn_tinycnn", num_classes=3)
    system.model, system.log = model, (lambda *a, **k: None)
    system.eval()
    with torch.no_grad():
        system.validation_step({"image": torch.rand(6, 3, 64, 64), "label": labels}, 0)
    assert all(torch.allclose(before[k], v, equal_nan=True) for k, v in model.state_dict().items())


def test_single_category_mode_and_wrong_image_size() -> None:
    model = zoo.create_model("icnn_tinycnn", num_classes=4, single_category=2)
    assert (model.added_filters.filter_category == 2).all()
    with pytest.raises(ValueError, match=r"built for \(8, 8\) maps.*got \(4, 4\)"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="single_category must be a class id"):
        zoo.create_model("icnn_tinycnn", num_classes=4, single_category=7)


def test_learned_beta_gets_a_gradient() -> None:
    model = zoo.create_model("icnn_tinycnn", num_classes=3, learn_beta=True)
    model(torch.rand(2, 3, 64, 64))["logits"].sum().backward()
    assert model.added_filters.beta.grad is not None and model.added_filters.beta.grad.abs().sum() > 0


def test_balanced_assignment_spreads_filters_over_classes() -> None:
    model = zoo.create_model("icnn_tinycnn", num_classes=4, category_assignment="balanced")
    layer = model.added_filters
    filters = layer.beta.numel()
    raw = torch.zeros(8, filters, 8, 8)
    raw[:, :, 0, 0] = 1.0
    labels = torch.tensor([0, 1, 2, 3] * 2)
    raw[labels == 3, :, 2, 2] = 9.0  # every filter prefers class 3: argmax would give all filters to it
    raw[labels == 1, 5, 3, 3] = 20.0  # filter 5 is by far the most class-1 filter
    layer.update_statistics(raw, torch.zeros(layer.log_mean_z.shape), labels)  # the first step solves at once
    counts = torch.bincount(layer.filter_category, minlength=4)
    assert counts.tolist() == [filters // 4] * 4 and layer.filter_category[5] == 1
    with pytest.raises(ValueError, match="category_assignment must be one of"):
        zoo.create_model("icnn_tinycnn", category_assignment="greedy")


def test_a_new_head_gives_the_filters_its_classes() -> None:
    """reset_classifier (fine-tuning onto other classes) resizes every layer's category statistics: a filter can
    then take any new class, as in a model built with that many (the old (F, 3) statistics never gave classes 3-6)."""
    model = zoo.create_model("icnn_tinycnn", num_classes=3, category_assignment="balanced")
    model.reset_classifier(7)
    assert model.head.fc.out_features == 7
    for layer in model.interpretable_layers():
        assert layer.class_activation.shape == (layer.beta.numel(), 7) and layer.class_seen.shape == (7,)
    model.train()
    images, labels = torch.rand(14, 3, 64, 64), torch.arange(14) % 7
    out = model(images)
    model.update_statistics(out, {"label": labels})
    assert torch.bincount(model.added_filters.filter_category, minlength=7).min() > 0  # balanced over all 7
    single = zoo.create_model("icnn_tinycnn", num_classes=5, single_category=4)
    with pytest.raises(ValueError, match="single_category 4 is no class id of a 3-class head"):
        single.reset_classifier(3)


def test_balanced_categories_reach_the_next_forward_and_every_checkpoint() -> None:
    """The balanced solve is queued by `update_statistics` and done by the next forward (then it is a no-op) or
    by `state_dict`, so a checkpoint holds the categories its class statistics give; only a model's first training
    step solves its own statistics at once (the initial categories put every filter on class 0)."""
    model = zoo.create_model("icnn_tinycnn", num_classes=4, category_assignment="balanced", category_momentum=0.0)
    layer = model.added_filters
    labels = torch.tensor([0, 1, 2, 3])
    raw = torch.rand(4, layer.beta.numel(), 8, 8)
    raw[labels == 2, :8] += 5.0  # the first 8 filters fire on class 2
    layer.update_statistics(raw, torch.zeros(layer.log_mean_z.shape), labels)  # the first step: solved at once
    assert (layer.filter_category[:8] == 2).all()
    layer.update_statistics(raw.roll(1, 0), torch.zeros(layer.log_mean_z.shape), labels)  # now class 3's: queued
    assert (layer.filter_category[:8] == 2).all()  # this step's loss does not wait for its own solve
    out = model(torch.rand(2, 3, 64, 64))
    assert (out["filter_category"][-1][:8] == 3).all()
    with mock.patch("zoo.icnn.model.linear_sum_assignment") as solver:
        model(torch.rand(2, 3, 64, 64))
        model.state_dict()
    solver.assert_not_called()  # nothing new queued: nothing solved again
    layer.update_statistics(raw, torch.zeros(layer.log_mean_z.shape), labels)  # class 2's again: queued
    saved = model.state_dict()
    assert (saved["added_filters.filter_category"][:8] == 2).all()  # solved for the checkpoint
    fresh = zoo.create_model("icnn_tinycnn", num_classes=4, category_assignment="balanced", category_momentum=0.0)
    fresh.load_state_dict(saved)
    fresh.added_filters.update_statistics(raw.roll(1, 0), torch.zeros(layer.log_mean_z.shape), labels)
    assert (fresh.added_filters.filter_category[:8] == 2).all()  # resumed past its first step: queued, not solved


def test_a_filter_that_hits_no_part_is_labelled_none_not_part_type_zero() -> None:
    """The filter table and figure labelled a filter whose part scores are all 0 "red circle (0.00)": part type 0,
    the argmax of an all-zero row. It hits no part: "none". A filter with a hit keeps its best part and hit rate."""
    from types import SimpleNamespace

    from zoo.icnn.callback import FilterMapsCallback

    trainer = SimpleNamespace(datamodule=SimpleNamespace(attribute_names=["red circle", "green square", "blue bar"]))
    scores = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.25, 0.5], [float("nan"), 0.0, 0.0], [float("nan"), 0.0, 0.75]])
    rows = FilterMapsCallback._describe(trainer, {}, [0, 1, 2, 3], scores)  # (filter, category, part) per filter
    assert [part for _, _, part in rows] == ["none", "blue bar (0.50)", "none", "blue bar (0.75)"]


def test_filter_maps_callback_writes_tensorboard_and_run_folder(tmp_path, monkeypatch) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from datamodules import PartsWorldDataModule
    from zoo.engine import callbacks
    from zoo.figures import class_name, save_figure
    from zoo.icnn.callback import FilterMapsCallback

    figures = []  # the labelled figure, as saved (by FixedBatchCallback.publish)
    monkeypatch.setattr(callbacks, "save_figure",
                        lambda figure, path: (figures.append(figure), save_figure(figure, path)))
    pl.seed_everything(0)
    data = PartsWorldDataModule(num_train=64, num_val=32, num_test=8, batch_size=32)
    system = ICNNSystem("icnn_tinycnn", num_classes=6, loss=FilterPartLoss(), part_maps_key="filter_maps",
                        class_names=data.class_names)
    logger = TensorBoardLogger(tmp_path, name="run", version="")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=logger,
                         callbacks=[FilterMapsCallback(num_filters=3, num_images=4)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(system, datamodule=data)
    folder = tmp_path / "run" / "filters"
    table = (folder / "epoch0.md").read_text().splitlines()
    assert (folder / "epoch0.png").is_file() and len(table) == 2 + 3
    category, part = table[2].split("|")[3].strip(), table[2].split("|")[4].strip()
    assert category in {class_name(data, k) for k in range(data.num_classes)}
    assert any(colour in part for colour in ("red", "green", "blue", "yellow", "magenta", "cyan"))
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    labels = [ax.get_ylabel() for ax in figures[0].axes if ax.get_ylabel()]  # one per row: filter, category, part
    assert labels == [f"filter {r.split('|')[2].strip()}\ncategory: {r.split('|')[3].strip()}\npart: "
                      f"{r.split('|')[4].strip()}" for r in table[2:]]
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_title()]  # the fixed batch: one image per class
    assert titles == [f"true: {class_name(data, k)}" for k in range(4)]
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert "filters/maps" in events.Tags()["images"]


def test_eval_scores_each_batch_with_its_own_z() -> None:
    """Regression: eval used the training-time running Z_T; eval-mode BN shifts the scale and the loss blew up."""
    torch.manual_seed(0)
    model = zoo.create_model("icnn_tinycnn", num_classes=3, tau_scale=16.0)
    layer = model.added_filters
    layer.log_mean_z.fill_(-50.0)  # a running estimate far below what this batch scores
    model.eval()
    out = model(torch.rand(4, 3, 64, 64))
    batch_z = log_mean_exp_over_batch(out["template_scores"][-1])
    assert torch.allclose(out["log_mean_z"][-1], batch_z)
    terms = FilterPartLoss()(out, {"label": torch.tensor([0, 1, 2, 0])})
    assert terms["loss_filter"].abs() < 10


# --------------------------------------------------------------------------- part metrics (from test_part_metrics.py)
def reference_instability(maps: np.ndarray, landmarks: np.ndarray, visible: np.ndarray, image: int,
                          top_n: int) -> float:
    """The authors' getDistSqrtVar.m: for each filter and landmark, the images where the landmark is visible, ranked
    by the filter's peak, the top N of them (invalid images dropped before the top N is taken, not after)."""
    batch, filters, h, w = maps.shape
    values = []
    for f in range(filters):
        peaks = [maps[b, f].max() for b in range(batch)]
        ranked = sorted(range(batch), key=lambda b: -peaks[b])
        for k in range(landmarks.shape[1]):
            distances = []
            for b in [b for b in ranked if visible[b, k]][:top_n]:
                i, j = np.unravel_index(maps[b, f].argmax(), (h, w))
                centre = ((j + 0.5) * image / w, (i + 0.5) * image / h)
                distances.append(math.dist(centre, landmarks[b, k]))
            if len(distances) >= 2:
                values.append(np.std(distances, ddof=1) / math.hypot(image, image))
    return float(np.mean(values))


def test_location_instability_matches_reference_across_batches() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((10, 3, 4, 4)).astype(np.float32)
    landmarks = rng.random((10, 2, 2)).astype(np.float32) * 16
    visible = rng.random((10, 2)) > 0.2
    metric = LocationInstability(image_size=16, top_n=4)
    for part in (slice(0, 3), slice(3, 7), slice(7, 10)):  # top-N must be global, not per batch
        metric.update(torch.tensor(maps[part]), torch.tensor(landmarks[part]), torch.tensor(visible[part]))
    expected = reference_instability(maps, landmarks, visible, 16, 4)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)
    sparse = np.zeros((10, 2), dtype=bool)
    sparse[3:8, 0] = sparse[:, 1] = True  # landmark 0 visible in 5 images only: its top 4 are among those five
    metric = LocationInstability(image_size=16, top_n=4)
    metric.update(torch.tensor(maps), torch.tensor(landmarks), torch.tensor(sparse))
    assert torch.isfinite(metric.per_filter()).all()
    assert metric.compute().item() == pytest.approx(reference_instability(maps, landmarks, sparse, 16, 4), rel=1e-5)


def test_a_filter_locked_to_a_landmark_is_perfectly_stable() -> None:
    landmarks = torch.tensor([[[2.0, 6.0]], [[10.0, 14.0]], [[6.0, 2.0]]])  # one landmark per image, unit centres
    maps = torch.zeros(3, 2, 4, 4)
    for b, (x, y) in enumerate(landmarks[:, 0].tolist()):
        maps[b, 0, int(y // 4), int(x // 4)] = 1.0 + b  # filter 0 fires on the landmark
        maps[b, 1, 0, 0] = 1.0 + b  # filter 1 fires at a fixed corner: unstable relative to the landmark
    metric = LocationInstability(image_size=16)
    metric.update(maps, landmarks)
    per_filter = metric.per_filter()
    assert per_filter[0, 0] == 0 and per_filter[1, 0] > 0.1


def reference_part_scores(maps: torch.Tensor, masks: np.ndarray, types: np.ndarray, quantile: float,
                          threshold: float, num_parts: int) -> np.ndarray:
    up = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=False).numpy()
    scores = np.zeros((maps.shape[1], num_parts))
    for f in range(maps.shape[1]):
        values = np.sort(maps[:, f].numpy().ravel())[::-1]  # T_f on the activations, before upsampling (the spec)
        t_f = values[max(1, int(quantile * values.size))]  # the top int(q * size) values lie strictly above
        for k in range(num_parts):
            with_part = [n for n in range(len(masks)) if k in types[n]]
            hits = 0
            for n in with_part:
                active = up[n, f] > t_f
                for p in np.flatnonzero(types[n] == k):
                    union = (active | masks[n, p]).sum()
                    hits += union > 0 and (active & masks[n, p]).sum() / union > threshold
            scores[f, k] = hits / max(1, len(with_part))
    return scores


def test_part_iou_matches_reference() -> None:
    rng = np.random.default_rng(1)
    maps = torch.tensor(rng.random((6, 4, 4, 4)), dtype=torch.float32)
    masks = rng.random((6, 2, 8, 8)) > 0.6
    types = rng.integers(0, 3, (6, 2))
    metric = PartIoU(num_parts=3, quantile=0.2, iou_threshold=0.1, filter_chunk=3)
    metric.update(maps[:4], torch.tensor(masks[:4]), torch.tensor(types[:4]))
    metric.update(maps[4:], torch.tensor(masks[4:]), torch.tensor(types[4:]))
    expected = reference_part_scores(maps, masks, types, 0.2, 0.1, 3)
    assert np.allclose(metric.part_scores().numpy(), expected)
    assert metric.compute().item() == pytest.approx(expected.max(1).mean())


def test_a_filter_that_is_the_part_mask_scores_one() -> None:
    masks = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    for n in range(4):
        masks[n, 0, n:n + 2, 2:4] = True  # 4 pixels per image, 16 of 256 in all
    maps = masks.float()  # same resolution: no interpolation blur
    metric = PartIoU(quantile=16 / 256)
    metric.update(maps, masks)
    assert metric.compute().item() == 1.0
    with pytest.raises(ValueError, match=r"Expected maps \(B, F, h, w\) and part_masks"):
        metric.update(maps[:, 0], masks)


def test_with_labels_top_images_come_from_the_filters_category() -> None:
    """Filter 0 fires at a fixed place relative to class-0 landmarks and strongly but erratically on class 1
    images; per category only its class-0 images count (class 0 has the higher mean peak)."""
    rng = np.random.default_rng(2)
    maps = torch.zeros(8, 1, 4, 4)
    landmarks = torch.zeros(8, 1, 2)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for b in range(8):
        i, j = rng.integers(0, 4, 2)
        landmarks[b, 0] = torch.tensor([(j + 0.5) * 4, (i + 0.5) * 4])
        if b < 4:
            maps[b, 0, i, j] = 10.0  # on the landmark
        else:
            maps[b, 0, rng.integers(0, 4), rng.integers(0, 4)] = 3.0
    metric = LocationInstability(image_size=16, top_n=4)
    metric.update(maps, landmarks, labels=labels)
    assert metric.compute().item() == 0.0
    without_labels = LocationInstability(image_size=16, top_n=6)
    without_labels.update(maps, landmarks)
    assert without_labels.compute().item() > 0.0


def test_negative_template_mask_cached_under_inference_mode_still_trains() -> None:
    """The T- mask is cached per template count and device: a first MI under `torch.inference_mode` (as in
    Lightning's validation) must leave nothing that a later training step's backward cannot use."""
    from losses.icnn import _is_negative_template

    _is_negative_template.cache_clear()
    scores = torch.randn(4, 2, 10)
    args = (torch.tensor([[True, False]] * 4), log_template_prior(9), log_mean_exp_over_batch(scores))
    with torch.inference_mode():
        filter_mutual_information(scores, *args)
    assert not _is_negative_template(10, scores.device).is_inference()
    trained = scores.clone().requires_grad_()
    filter_mutual_information(trained, *args).sum().backward()
    assert trained.grad is not None and torch.isfinite(trained.grad).all()


@pytest.mark.parametrize("mu, learn_beta", [("argmax", False), ("argmax", True), ("centroid", False)])
def test_masked_maps_and_their_gradient_are_the_papers(mu: str, learn_beta: bool) -> None:
    """max(x * mask, 0) with x the ReLU map, however the layer computes it (a frozen argmax beta reads a table of
    the masks' non-negative part): the same maps and the same gradient to the layer's input, also where the mask is
    exactly 0 (distance n / beta on an 8x8 map) and where the input is negative."""
    from zoo.icnn.model import InterpretableFilters

    torch.manual_seed(0)
    layer = InterpretableFilters(3, 2, (8, 8), mu=mu, learn_beta=learn_beta)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    masked, _ = layer(x)
    raw = torch.relu(x)
    expected = torch.relu(raw * part_mask(raw, layer.beta, mu))
    assert torch.equal(masked, expected)
    upstream = torch.randn_like(masked)
    grad, = torch.autograd.grad(masked, x, upstream, retain_graph=True)
    expected_grad, = torch.autograd.grad(expected, x, upstream)
    assert torch.equal(grad, expected_grad)
    assert (x < 0).any() and (mu != "argmax" or (part_mask(raw, layer.beta, mu) == 0).any())  # the edge cases


def test_a_diverged_step_keeps_the_balanced_categories_for_the_loss_check_to_name() -> None:
    """NaN class statistics went to scipy's solver ("matrix contains invalid numeric entries") before the engine's
    non-finite loss check could name the step; they now leave the categories as they were."""
    model = zoo.create_model("icnn_tinycnn", num_classes=4, category_assignment="balanced")
    layer = model.added_filters
    labels = torch.tensor([0, 1, 2, 3] * 2)
    raw = torch.rand(8, layer.beta.numel(), 8, 8)
    layer.update_statistics(raw, torch.zeros(layer.log_mean_z.shape), labels)
    before = layer.filter_category.clone()
    layer.update_statistics(torch.full_like(raw, float("nan")), torch.zeros(layer.log_mean_z.shape), labels)
    layer.refresh_categories()
    assert torch.equal(layer.filter_category, before)


def test_loss_templates_use_the_masks_beta_and_vgg_reads_conv5_3() -> None:
    """The filter loss scores the templates the masks use (beta), and on VGG the interpretable layers read conv5_3's
    ReLU map (stride 16: 14 x 14 at 224 px), as the authors' network, not pool5's 7 x 7."""
    from zoo.icnn.model import InterpretableFilters
    from zoo.icnn.ops import template_bank

    layer = InterpretableFilters(2, 3, (6, 6), beta=2.0)
    assert torch.equal(layer.bank, template_bank(6, 6, beta=2.0))
    assert not torch.equal(layer.bank, template_bank(6, 6, beta=4.0))
    model = zoo.create_model("icnn_vgg16", num_classes=3, image_size=224)
    assert model.top_filters.map_size == (14, 14) and model.backbone.reductions == [16]


def test_a_skipped_batch_leaves_the_filters_statistics_as_they_were() -> None:
    """nonfinite_loss="skip": the running Z_T, which the forward replaces (a new tensor, not an in-place write), and
    the class statistics come back to their values before the skipped batch."""
    from zoo.icnn.system import ICNNSystem

    class NaNLoss(torch.nn.Module):
        def forward(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
            return {"loss_task": out["logits"].sum() * float("nan")}

    torch.manual_seed(0)
    system = ICNNSystem("icnn_tinycnn", num_classes=3, image_size=32, nonfinite_loss="skip", loss=NaNLoss())
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    before = {name: buffer.clone() for name, buffer in system.named_buffers()}
    with pytest.warns(UserWarning, match="batch skipped"):
        assert system.training_step(batch, 0) is None
    after = dict(system.named_buffers())
    changed = [name for name in before if not torch.equal(before[name].nan_to_num(-1.0), after[name].nan_to_num(-1.0))]
    assert not changed, changed


def test_peaks_sit_at_their_cells_receptive_field_centre() -> None:
    """A 70-pixel image through a stride-8 net gives an 8 x 8 map (the last 6 pixels dropped): cell 7's centre is
    at 7.5 x 8 = 60 pixels, not 7.5 x 70 / 8 = 65.6; on a multiple of the stride both rules agree."""
    from zoo.icnn.metrics import peak_positions

    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 7, 7] = 1.0
    assert peak_positions(maps, (70, 70), stride=8)[1].tolist() == [[[60.0, 60.0]]]
    assert torch.equal(peak_positions(maps, (64, 64), stride=8)[1], peak_positions(maps, (64, 64))[1])
    from zoo.icnn.system import ICNNSystem

    system = ICNNSystem("icnn_tinycnn", num_classes=3, image_size=70)
    assert system.metrics["val_location_instability"].stride == 8


def test_a_skipped_batch_queues_no_balanced_assignment() -> None:
    """category_assignment="balanced" queues the class shares of each training step for the next forward's solve; a
    skipped batch's shares are dropped with its statistics, so the categories stay those of the good steps."""
    from zoo.icnn.system import ICNNSystem

    class NaNAfterFirst(torch.nn.Module):
        calls = 0

        def forward(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
            self.calls += 1
            return {"loss_task": out["logits"].sum() * (float("nan") if self.calls > 1 else 0.0)}

    torch.manual_seed(0)
    system = ICNNSystem("icnn_tinycnn", num_classes=3, image_size=32, nonfinite_loss="skip", loss=NaNAfterFirst(),
                        model_kwargs={"category_assignment": "balanced"})
    good = {"image": torch.rand(6, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    system.training_step(good, 0)
    system.model.refresh_categories()
    before = [layer.filter_category.clone() for layer in system.model.interpretable_layers()]
    skipped = {"image": torch.rand(6, 3, 32, 32) * 5, "label": torch.tensor([2, 2, 2, 2, 2, 2])}  # all one class
    with pytest.warns(UserWarning, match="batch skipped"):
        assert system.training_step(skipped, 1) is None
    system.model.refresh_categories()
    assert all(torch.equal(b, layer.filter_category) for b, layer in zip(before, system.model.interpretable_layers()))


def _receptive_field_centre(backbone: torch.nn.Module, size: int) -> tuple[int, float]:
    """Row of the top map's middle cell and the centre (pixels, pixel p covering [p, p + 1)) of its receptive field,
    measured: the rows of an input whose gradient reaches that cell, on a copy with positive weights (every path
    open) and max-pools swapped for average pools of the same window (a max passes one pixel's gradient)."""
    import copy

    net = copy.deepcopy(backbone).eval()
    for name, module in list(net.named_modules()):
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.abs() * 1e-2 + 1e-3
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.fill_(1.0), module.bias.data.fill_(0.01)
            module.running_mean.zero_(), module.running_var.fill_(1.0)
        elif isinstance(module, torch.nn.MaxPool2d):
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr,
                    torch.nn.AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode))
    x = torch.rand(1, 3, size, size, requires_grad=True)
    top = net(x)[-1]  # (1, C, h, w)
    row = top.shape[-2] // 2
    (grad,) = torch.autograd.grad(top[0, :, row, row].sum(), x)
    rows = (grad.abs().sum((0, 1, 3)) > 0).nonzero()[:, 0]
    assert 0 < rows.min() and rows.max() < size - 1, "the receptive field must fit in the image to be measured"
    return row, (int(rows.min()) + int(rows.max()) + 1) / 2


@pytest.mark.parametrize("model_name, kwargs, size", [
    ("icnn_tinycnn", {}, 64),  # 2 x 2 max-pools: cell i at (i + 0.5) x 8
    ("icnn_resnet18", {}, 480),  # padded strided convolutions: cell i at i x 32 + 0.5
    ("icnn_timm", {"backbone": "torchvision:mobilenet_v2"}, 544),
])
def test_location_instability_places_peaks_at_the_measured_receptive_field_centre(model_name: str, kwargs: dict,
                                                                                   size: int) -> None:
    """The metric's cell -> pixel map is the backbone's own: a cell's measured receptive-field centre, not
    (i + 0.5) x stride (16 pixels off on resnet18 and mobilenet_v2, half a cell)."""
    system = ICNNSystem(model_name, num_classes=3, image_size=size, model_kwargs=kwargs)
    row, centre = _receptive_field_centre(system.model.backbone, size)
    metric = system.metrics["val_location_instability"]
    maps = torch.zeros(1, 1, *system.model.top_filters.map_size)
    maps[0, 0, row, row] = 1.0
    metric.update(maps, torch.tensor([[[centre, centre]]]))  # a landmark at the cell's centre
    assert metric.distances[0].item() == 0.0  # the metric places the peak there


def test_peak_positions_stay_in_the_image() -> None:
    """A net that drops the image's last pixels (70 px through stride 8) or pads past it: a cell centre beyond the
    image is clipped to its edge; resnet18 at 100 px puts its last cell at 96.5, inside (the old rule said 112)."""
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 7, 0] = 1.0  # row 7 (y), column 0 (x): at (4, 60) before clipping
    metric = LocationInstability(58, stride=8)
    metric.update(maps, torch.tensor([[[4.0, 58.0]]]))
    assert metric.distances[0].item() == 0.0
    metric = ICNNSystem("icnn_resnet18", num_classes=3, image_size=100).metrics["val_location_instability"]
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 3, 3] = 1.0
    metric.update(maps, torch.tensor([[[96.5, 96.5]]]))
    assert metric.distances[0].item() == 0.0


def test_torchvision_vgg_reads_conv5_3_and_the_plain_twin_scores_the_same_layer() -> None:
    """"torchvision:vgg16" is VGG too (conv5_3, stride 16, not pool5); the plain twin declared by ICNNSystem reads
    conv5_3 as well (`top_conv`), so ICNN and twin are scored at the same resolution, while baseline_vgg16 itself
    keeps pool5."""
    import yaml

    from zoo.cli.compare import declared_twins, resolved_model_config

    model = zoo.create_model("icnn_timm", backbone="torchvision:vgg16", num_classes=3, image_size=64)
    assert model.top_filters.map_size == (4, 4) and model.backbone.reductions == [16]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert zoo.create_model("baseline_vgg16", num_classes=3)(x)["features"].shape[-2:] == (2, 2)  # pool5
        plain = zoo.create_model("baseline_vgg16", num_classes=3, top_conv=True)
        assert plain(x)["features"].shape[-2:] == (4, 4) and plain.backbone.reductions == [16]
    config = "configs/icnn/cub200.yaml"
    args = declared_twins(config, yaml.safe_load(open(config)))["plain_cnn"]
    twin = resolved_model_config(config, args)["init_args"]
    assert twin["model_name"] == "baseline_vgg16" and twin["model_kwargs"]["top_conv"] is True


def test_alexnet_reads_conv5_as_vgg_does_with_its_true_strides() -> None:
    """AlexNet's torchvision features end in pool5 as VGG's do (the type of the last layer, not the name, decides): the
    interpretable filters read relu5 (13 x 13 at 224 px, stride 16), not pool5's 6 x 6; and its maps' strides are 4,
    8, 16, 32 (not 4, 9, 21, 64: its unpadded layers lose border cells, so 64 px / map size is not the stride)."""
    from zoo.backbones import top_conv_index

    model = zoo.create_model("icnn_timm", backbone="torchvision:alexnet", num_classes=3, image_size=224)
    assert model.top_filters.map_size == (13, 13) and model.backbone.reductions == [16]
    with torch.no_grad():
        assert model.backbone(torch.rand(1, 3, 224, 224))[0].shape == (1, 256, 13, 13)
    assert zoo.Backbone("torchvision:alexnet", out_indices=(0, 1, 2, 3)).reductions == [4, 8, 16, 32]
    assert [top_conv_index(name) for name in ("torchvision:alexnet", "torchvision:vgg16", "vgg16",
                                              "torchvision:mobilenet_v2", "resnet18", "tinycnn")] == [-2, -2, -2,
                                                                                                      -1, -1, -1]


def test_every_icnn_compare_config_has_the_ordinary_twin() -> None:
    """The paper's baseline, the same layers as ordinary conv layers (masks off, lambda 0), is in every compare spec
    of the family, named ordinary_twin (a masked twin alone is an ablation, not the baseline)."""
    from pathlib import Path

    import yaml

    specs = sorted(Path("configs/icnn").glob("compare_*.yaml"))
    assert specs
    for path in specs:
        run = yaml.safe_load(path.read_text())["compare"]["runs"].get("ordinary_twin")
        assert run is not None, f"{path} has no ordinary_twin run"
        args = ICNNSystem.TWINS[run["twin"]] if "twin" in run else run.get("args", [])
        assert run.get("twin", "ordinary_twin") == "ordinary_twin", path
        assert any(a.endswith("loss.init_args.weight=0") for a in args), path
        assert any("masks=false" in a or "masks: false" in a for a in args), path


@pytest.mark.parametrize("setting, value", [("z_momentum", 0.0), ("z_momentum", 1.5), ("tau_scale", 0.0),
                                            ("tau_scale", -1.0), ("beta", 0.0), ("beta", -4.0),
                                            ("category_momentum", 1.0), ("category_momentum", -0.1)])
def test_bad_filter_settings_are_refused_when_built(setting: str, value: float) -> None:
    """Settings that would crash the first step (z_momentum 0: log(0)) or train silently wrong are refused by name
    when the model is built."""
    from zoo.icnn.model import InterpretableFilters

    with pytest.raises(ValueError, match=setting):
        InterpretableFilters(4, 3, (4, 4), **{setting: value})
    with pytest.raises(ValueError, match=setting):
        zoo.create_model("icnn_tinycnn", num_classes=3, image_size=32, **{setting: value})


def test_class_statistics_are_float32_under_bf16_autocast() -> None:
    """The per-class sums of peak activations that feed the category average are taken in float32, not as a bf16
    matmul under autocast (which moved 2 of 128 filters' categories after 4 steps)."""
    from zoo.icnn.model import InterpretableFilters

    torch.manual_seed(0)
    raw = torch.rand(16, 32, 4, 4) * 10
    labels = torch.randint(0, 5, (16,))
    layer = InterpretableFilters(32, 5, (4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.update_statistics(raw, torch.zeros(32, 17), labels)
    peak = raw.double().flatten(2).amax(-1)  # (B, F)
    expected = torch.stack([peak[labels == c].mean(0) if (labels == c).any() else torch.zeros(32)
                            for c in range(5)], 1)  # (F, C)
    assert torch.allclose(layer.class_activation.double(), expected, rtol=1e-6, atol=1e-6)


def test_part_iou_thresholds_the_activations_before_upsampling() -> None:
    """T_f is the top quantile of the filter's activations (Network Dissection, the spec), then the map is upsampled
    and binarised at T_f: one lit cell of a 2 x 2 map spreads over the 6 x 6 pixels its bilinear upsampling reaches,
    IoU 16 / 36 with its 4 x 4 quarter. (A T_f taken on the upsampled map would keep the top 16 pixels, IoU 1.)"""
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # (1, 1, 2, 2)
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :4] = True
    metric = PartIoU(quantile=0.25, iou_threshold=0.4)
    metric.update(maps, masks)
    assert metric.compute().item() == 1.0  # 16 / 36 = 0.44 > 0.4
    metric = PartIoU(quantile=0.25, iou_threshold=0.5)
    metric.update(maps, masks)
    assert metric.compute().item() == 0.0  # 0.44 < 0.5 (the upsampled-threshold order gave 1.0)


def _hot_cell_and_part(mask_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4 x 4 map of a 64-pixel image whose cell (1, 1) fires (1.0; cell (3, 3) at 0.4 sets T_f = 0.4 at the
    quantile 1 / 16), and a part mask: the 15 x 15 pixels around that cell's receptive-field centre on a net that
    downsamples by padded strided convolutions (stride 16, offset 0.5: 16.5 px), at `mask_size` pixels."""
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1, 1], maps[0, 0, 3, 3] = 1.0, 0.4
    masks = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    masks[0, 0, 9:24, 9:24] = True  # pixel centres 9.5 .. 23.5 around 16.5
    if mask_size != 64:
        masks = F.interpolate(masks.float(), size=(mask_size, mask_size), mode="nearest") > 0.5
    return maps, masks


def test_part_iou_upsamples_each_cell_at_its_receptive_field_centre() -> None:
    """Network Dissection upsamples a unit by its receptive field: with the backbone's geometry (resnet-like, cell i
    at i x 16 + 0.5) the lit cell's pixels above T_f are a bilinear tent around 16.5 px, inside the part (IoU 0.76),
    where the even spread (F.interpolate) centred it at 24 px, half a cell off (IoU 0.15): a hit the old
    upsampling missed. Masks at half the image's size get the geometry scaled to theirs."""
    maps, masks = _hot_cell_and_part()
    tent = [(1 - ((torch.arange(64) + 0.5 - c).abs() / 16)).clamp(min=0) for c in (16.5, 24.0)]
    iou = {}
    for centre, t in zip(("measured", "even"), tent):
        active = t[:, None] * t[None] > 0.4  # the upsampled map above T_f, written out
        iou[centre] = ((active & masks[0, 0]).sum() / (active | masks[0, 0]).sum()).item()
    assert iou["measured"] > 0.7 and iou["even"] < 0.2, iou
    for geometry, expected in (({"image_size": 64, "stride": 16, "offset": 0.5}, 1.0), ({}, 0.0)):
        metric = PartIoU(quantile=1 / 16, iou_threshold=0.5, **geometry)
        metric.update(maps, masks)
        assert metric.part_scores().tolist() == [[expected]], geometry
    maps, small = _hot_cell_and_part(mask_size=32)
    metric = PartIoU(quantile=1 / 16, iou_threshold=0.5, image_size=64, stride=(16, 16), offset=(0.5, 0.5))
    assert metric.mask_geometry((32, 32)) == ((8.0, 8.0), (0.25, 0.25))
    metric.update(maps, small)
    assert metric.part_scores().tolist() == [[1.0]]
    with pytest.raises(ValueError, match="offset"):
        PartIoU(offset=0.5)


def test_part_iou_without_a_geometry_or_on_max_pool_nets_is_the_even_spread_to_the_bit() -> None:
    """No geometry, or a 2 x 2 max-pool net's (offset = stride / 2) on a multiple of its stride: the maps are
    upsampled by F.interpolate exactly as before, so every part score is the previous one."""
    rng = np.random.default_rng(3)
    maps = torch.tensor(rng.random((6, 5, 4, 4)), dtype=torch.float32)
    masks = rng.random((6, 2, 32, 32)) > 0.7
    types = rng.integers(0, 3, (6, 2))
    expected = reference_part_scores(maps, masks, types, 0.2, 0.1, 3)  # the F.interpolate (even spread) formula
    scores = []
    for geometry in ({}, {"image_size": 32, "stride": 8, "offset": 4.0}, {"stride": (8, 8), "offset": (4.0, 4.0)}):
        metric = PartIoU(num_parts=3, quantile=0.2, iou_threshold=0.1, filter_chunk=2, **geometry)
        metric.update(maps, torch.tensor(masks), torch.tensor(types))
        scores.append(metric.part_scores())
        assert np.allclose(scores[-1].numpy(), expected), geometry
    assert all(torch.equal(s, scores[0]) for s in scores)


@pytest.mark.parametrize("model_name, stride, offset", [("icnn_resnet18", (32.0, 32.0), (0.5, 0.5)),
                                                       ("icnn_tinycnn", (8.0, 8.0), (4.0, 4.0))])
def test_the_system_gives_part_iou_the_backbones_measured_geometry(model_name: str, stride: tuple,
                                                                  offset: tuple) -> None:
    """ICNNSystem hands part IoU the top map's measured geometry, as it does location instability: on resnet18 a
    lit cell (1, 1) of the 2 x 2 map at 64 px is centred at 32.5 px (the even spread: 48 px)."""
    system = ICNNSystem(model_name, num_classes=3, image_size=64)
    metric = system.metrics["val_part_iou"]
    assert metric.geometry == (stride, offset) and metric.image_size == (64, 64)
    instability = system.metrics["val_location_instability"]
    assert tuple(float(s) for s in np.broadcast_to(instability.stride, 2)) == stride
    assert tuple(instability.offset) == offset


def test_filter_pictures_draw_each_cell_where_the_part_metrics_place_it(monkeypatch) -> None:
    """`heatmap_overlay` with a map's geometry puts a lit cell's red at its receptive-field centre (without one:
    the even spread, as before, to the bit), and ICNN's filter pictures pass the backbone's geometry."""
    from types import SimpleNamespace

    import zoo.icnn.callback
    from zoo.backbones import MapGeometry
    from zoo.figures import heatmap_overlay
    from zoo.icnn.callback import FilterMapsCallback

    images, maps = torch.zeros(2, 1, 64, 64), torch.zeros(3, 2, 4, 4)
    maps[:, :, 1, 1] = 1.0
    red = heatmap_overlay(images, maps, MapGeometry((16.0, 16.0), (0.5, 0.5)))[0, 0, 0]  # (64, 64)
    assert divmod(int(red.argmax()), 64) == (16, 16)  # pixel 16 covers the centre 16.5
    old = F.interpolate(maps, size=(64, 64), mode="bilinear", align_corners=False)
    old = old / old.flatten(1).amax(1).clamp(min=1e-8)[:, None, None, None]
    expected = (0.55 * old[:, :, None] * torch.tensor([1.0, 0.1, 0.1])[None, None, :, None, None]).clamp(0, 1)
    assert torch.equal(heatmap_overlay(images, maps), expected)

    seen = []
    monkeypatch.setattr(zoo.icnn.callback, "heatmap_overlay",
                        lambda images, maps, geometry=None: (seen.append(geometry), heatmap_overlay(images, maps))[1])
    system = ICNNSystem("icnn_resnet18", num_classes=3, image_size=64).eval()
    callback = FilterMapsCallback(num_filters=2, num_images=2)
    callback.batch = {"image": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 1])}
    monkeypatch.setattr(callback, "publish", lambda *args, **kwargs: None)
    with torch.no_grad():
        callback.draw(SimpleNamespace(datamodule=SimpleNamespace()), system, None)
    assert seen == [MapGeometry((32.0, 32.0), (0.5, 0.5))]


@pytest.mark.parametrize("alpha", [0, 1.0, 1.5, -0.1, float("nan")])
def test_an_alpha_outside_zero_one_is_refused_when_the_loss_is_made(alpha: float) -> None:
    """alpha = 1 gave log(1 - alpha) and alpha <= 0 log(alpha / n^2): "math domain error" from the first training step
    (after the data was built); the loss refuses it when made, naming alpha and its range."""
    with pytest.raises(ValueError, match=r"alpha .*strictly between 0 and 1; got alpha="):
        FilterPartLoss(alpha=alpha)
    assert FilterPartLoss(alpha=0.5).alpha == 0.5


def test_the_cli_says_a_wrong_alpha_once(in_tmp_dir, capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import REPO
    from train import command_line

    with pytest.raises(SystemExit) as exit_info:
        command_line(["fit", "--config", str(REPO / "configs/icnn/parts_world.yaml"),
                      "--model.init_args.loss.init_args.alpha=1.0", "--data.init_args.num_train=8",
                      "--data.init_args.num_val=8", "--trainer.max_epochs=1", "--trainer.logger=false"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("strictly between 0 and 1; got alpha=1.0") == 1
    assert "Traceback" not in error and "math domain error" not in error


def _plain_loop(update: bool, epochs: int = 2, batches: int = 2) -> torch.nn.Module:
    """The auditor's library use: ICNN trained by hand, with or without `update_statistics`."""
    torch.manual_seed(0)
    model = zoo.create_model("icnn_tinycnn", num_classes=6)
    loss_fn = FilterPartLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [{"image": torch.rand(6, 3, 64, 64), "label": torch.arange(6)} for _ in range(batches)]
    for epoch in range(epochs):
        loss_fn.set_epoch(epoch)
        for batch in data:
            out = model(batch["image"])
            if update:
                model.update_statistics(out, batch)
            optimizer.zero_grad()
            sum(loss_fn(out, batch).values()).backward()
            optimizer.step()
    return model


def test_a_plain_loop_without_update_statistics_is_warned_once() -> None:
    """Only `update_statistics` moves the filters' categories and Z_T: a plain loop that never called it trained every
    filter as a class-0 part detector against a batch-only Z_T, without a word."""
    import warnings

    with pytest.warns(UserWarning, match="update_statistics") as record:
        model = _plain_loop(update=False)
    assert sum("update_statistics" in str(w.message) for w in record) == 1
    assert (model.added_filters.filter_category == 0).all() and torch.isnan(model.added_filters.log_mean_z).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same loop calling it: no warning, and the filters learn categories
        model = _plain_loop(update=True)
    assert not (model.added_filters.filter_category == 0).all()
    assert torch.isfinite(model.added_filters.log_mean_z).all()


def test_icnn_settings_a_plain_classifier_cannot_give_are_refused_when_built() -> None:
    """A plain classifier in an ICNN config (a twin built by hand, missing one of the plain_cnn twin's overrides):
    the filter loss and the filter maps failed with a bare KeyError in the sanity check."""
    from losses.icnn import FilterPartLoss

    with pytest.raises(ValueError, match=r"baseline_tinycnn .*has no interpretable filters, so the filter loss "
                                         r"\(FilterPartLoss weight=1.0\).*loss.init_args.weight=0"):
        ICNNSystem("baseline_tinycnn", num_classes=6, loss=FilterPartLoss())
    with pytest.raises(ValueError, match=r"gives no 'filter_maps' .*part_maps_key=features"):
        ICNNSystem("baseline_tinycnn", num_classes=6, loss=FilterPartLoss(weight=0.0))
    ICNNSystem("baseline_tinycnn", num_classes=6, loss=FilterPartLoss(weight=0.0), part_maps_key="features")


def test_an_image_too_small_for_the_backbone_is_named() -> None:
    """8-pixel digits on VGG-16: torch's "Output size is too small" named neither the image size nor the backbone."""
    with pytest.raises(ValueError, match=r"image_size 4 is too small for backbone 'tinycnn'.*--data.init_args.image_size"):
        zoo.create_model("icnn_tinycnn", num_classes=3, image_size=4)

"""Interpretable CNN (Zhang, Wu & Zhu, CVPR 2018; TPAMI version arXiv 1901.02413) on any timm CNN backbone.

Faithful: every filter of the backbone's top conv stage and of an added 3x3 conv layer (zero padding; as wide as
the top stage, or `added_filters` >= 1 filters) is interpretable: its ReLU map is multiplied by the part mask around
its peak (argmax mu by default, the activation-weighted centroid and a learned per-filter beta as in the authors'
code) and carries the -MI(X; T) filter loss (`losses.icnn.FilterPartLoss`, on the pre-mask map). Each filter is
assigned the category with the highest exponential moving average of its per-class mean peak activation (authors'
code, momentum 0.9), updated only in training steps; single-category mode (class vs rest) assigns every filter to
one class.
Departs: the classifier after the interpretable layers is a pooled linear head (as for residual nets in the TPAMI
version), not VGG's fully connected stack. The template bank and the running log Z_T are sized for the top map of
an `image_size` input; another size raises a clear error. `tau_scale` multiplies the paper's tau = 0.5 / n^2
(see `losses.icnn.template_bank`): batch-normalised backbones need it.

Output dict:
    logits (B, C); features (B, M, h, w) masked output of the added layer (what the head reads);
    filter_maps / masked_filter_maps (B, M, h, w) pre-/post-mask maps of the added (top) layer;
    interpretable_maps, template_scores (B, F_l, T), log_mean_z (F_l, T), filter_category (F_l,): one per layer.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from zoo.icnn.ops import (MU_MODES, log_mean_exp_over_batch, part_mask, template_bank, template_scores,
                          template_shapes)
from zoo.distributed import all_reduce_, global_log_mean_exp
from zoo.registry import input_size_aware, register_model
from zoo.backbones import TINY_CNN, Backbone, PooledHeadMixin, PooledLinearHead, top_conv_index
from zoo.checks import positive_int
from zoo.layers import eval_mode


CATEGORY_ASSIGNMENTS = ("argmax", "balanced")


def check_settings(*, beta: float, tau_scale: float, category_momentum: float, z_momentum: float) -> None:
    """Refuse, by name, settings that would crash a later step (z_momentum 0: log(0) in the Z_T blend) or train
    silently wrong (non-positive template scale or slope, a category average that never or always forgets)."""
    bad = [f"beta must be > 0 (the templates' slope); got {beta}" if not beta > 0 else "",
           f"tau_scale must be > 0 (it scales the templates' tau); got {tau_scale}" if not tau_scale > 0 else "",
           f"category_momentum must be in [0, 1) (the weight of the past in the class statistics' moving average); got "
           f"{category_momentum}" if not 0 <= category_momentum < 1 else "",
           f"z_momentum must be in (0, 1] (the weight of each batch in the running Z_T); got {z_momentum}"
           if not 0 < z_momentum <= 1 else ""]
    if any(bad):
        raise ValueError("Interpretable filters: " + "; ".join(b for b in bad if b) + ".")


class InterpretableFilters(nn.Module):
    """Part mask for the filters of one ReLU map, plus the online statistics the filter loss needs.

    Category assignment: "argmax" (paper: the class with the highest EMA of mean peak activation) or "balanced"
    (each class gets at most ceil(F / C) filters, maximising each filter's share of activation on its class; an
    optimal assignment, solved in C by scipy). On the parts world argmax lets the filter loss drive every filter to
    one class (seen: 128 of 128 filters on one class, accuracy 0.30), so its configs use "balanced".
    The balanced solve is pipelined so that no step waits for its own statistics: `update_statistics` queues a
    non-blocking copy of the class shares to the host, and the next forward (or `refresh_categories`, or a state
    dict) solves it. A step's loss thus uses the categories of the statistics up to the previous step ("argmax" stays
    on the device and uses the current step's). The first training step is the exception: it solves its own
    statistics before its loss (one wait, once), as the initial categories put every filter on class 0, the collapse
    the balanced assignment exists to prevent. On a GPU the host waits only for the previous step's copy, which the
    device has finished by then unless the host is more than a step ahead; the device never waits for the host.

    Buffers: `class_activation` (F, C) EMA of per-class mean peak activation; `filter_category` (F,);
    `log_mean_z` (F, T) running log mean of exp(tr(x . T)) over the data (NaN until the first training step).
    Only `update_statistics` moves them (the forward never does): a training loop must call it after each training
    forward (`InterpretableCNN.update_statistics`; `ICNNSystem` does), or every filter stays a class-0 detector.
    The loss's templates (`bank`) are built with the masks' `beta`; with `learn_beta` the masks follow the learned
    beta while the loss keeps the initial one (rebuilding the bank each step would cost a pass per filter).
    """

    def __init__(self, num_filters: int, num_classes: int, map_size: tuple[int, int], *, beta: float = 4.0,
                 tau_scale: float = 1.0, learn_beta: bool = False, mu: str = "argmax",
                 single_category: int | None = None, category_assignment: str = "argmax",
                 category_momentum: float = 0.9, z_momentum: float = 0.1, masks: bool = True) -> None:
        super().__init__()
        self.masks = masks
        if category_assignment not in CATEGORY_ASSIGNMENTS:
            raise ValueError(f"category_assignment must be one of {CATEGORY_ASSIGNMENTS}; got {category_assignment!r}.")
        if mu not in MU_MODES:
            raise ValueError(f"mu must be one of {MU_MODES}; got {mu!r}.")
        if single_category is not None and not 0 <= single_category < num_classes:
            raise ValueError(f"single_category must be a class id in [0, {num_classes}); got {single_category}.")
        check_settings(beta=beta, tau_scale=tau_scale, category_momentum=category_momentum, z_momentum=z_momentum)
        self.map_size, self.mu, self.single_category = map_size, mu, single_category
        self.category_assignment = category_assignment
        self.category_momentum, self.z_momentum = category_momentum, z_momentum
        self.beta = nn.Parameter(torch.full((num_filters,), beta), requires_grad=learn_beta)
        bank = template_bank(*map_size, beta=beta, tau_scale=tau_scale)  # the loss's templates: the masks' beta
        self.register_buffer("bank", bank, persistent=False)
        self.register_buffer("class_activation", torch.zeros(num_filters, num_classes))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("log_mean_z", torch.full((num_filters, bank.shape[0]), math.nan))
        initial = torch.full((num_filters,), single_category if single_category is not None else 0)
        self.register_buffer("filter_category", initial.long())
        self._queued_share: tuple[torch.Tensor, torch.cuda.Event | None] | None = None  # see refresh_categories
        self._solved = False  # whether filter_category holds a solved assignment (a loaded state does)
        self.statistics_updates = 0  # calls of update_statistics (a Python count: read without a device sync)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(x) == 0:
            raise ValueError("Interpretable filters need at least one image: their template statistics (Z_T) are "
                             "means over the batch.")
        if tuple(x.shape[-2:]) != self.map_size:
            raise ValueError(f"Interpretable filters were built for {self.map_size} maps (image_size at creation); "
                             f"got {tuple(x.shape[-2:])}. Create the model with the image_size you feed it.")
        self.refresh_categories()  # no-op when `ICNNSystem` already did it outside a compiled forward
        raw = F.relu(x)
        if self.masks:
            # the table is an eager shortcut; a compiled forward takes the per-filter formula (the same values, which
            # the compiler fuses) instead of the table's uniformity check, a host read that would split its graph
            eager_table = self.mu == "argmax" and not (self.beta.requires_grad or torch.compiler.is_compiling())
            table = self._mask_table() if eager_table else None
            if table is not None:  # max(raw * mask, 0) = raw * max(mask, 0) as raw >= 0: the table holds max(mask, 0)
                masked = raw * part_mask(raw, self.beta, self.mu, table)
            else:
                masked = F.relu(raw * part_mask(raw, self.beta, self.mu))
        else:  # an ordinary conv layer: the map passes unmasked (statistics and template scores still kept)
            masked = raw
        scores = template_scores(raw, self.bank)  # (B, F, T)
        batch_z = log_mean_exp_over_batch(scores)  # (F, T)
        if self.training:  # the current batch enters Z_T with its gradient, the running part without
            unset = torch.isnan(self.log_mean_z)  # before the first training step
            running = self.log_mean_z.nan_to_num(0.0)  # finite in both where() branches, or NaN leaks into grads
            log_mean_z = torch.where(unset, batch_z, self._blend(running, batch_z))
        else:  # evaluation scores the batch on its own: eval-mode BN shifts the scale the running Z_T was taken at
            log_mean_z = batch_z
        return masked, {"raw": raw, "masked": masked, "scores": scores, "log_mean_z": log_mean_z,
                        "batch_z": batch_z.detach()}

    def _mask_table(self) -> torch.Tensor | None:
        """The non-negative part of every argmax mask of a frozen beta shared by all filters, (h*w, h*w), or None
        (per-filter betas). Rebuilt only when beta changes in place (a loaded checkpoint): the uniformity check reads
        the device then, not in every step."""
        key = (self.beta._version, self.beta.device)
        if getattr(self, "_table_key", None) != key:
            uniform = bool((self.beta == self.beta[0]).all())
            self._table = template_shapes(*self.map_size, self.beta[0]).flatten(1).clamp(min=0) if uniform else None
            self._table_key = key
        return self._table

    def _blend(self, running: torch.Tensor, batch_z: torch.Tensor) -> torch.Tensor:
        """log((1 - m) exp(running) + m exp(batch_z)): the exponential moving mean in log space."""
        m = self.z_momentum
        return torch.logaddexp(math.log(1 - m) + running, math.log(m) + batch_z) if m < 1 else batch_z

    @torch.no_grad()
    def update_statistics(self, raw: torch.Tensor, batch_z: torch.Tensor, labels: torch.Tensor) -> None:
        """One training step's update of Z_T and the category statistics (synchronised across processes): to call
        after each training forward with its `raw` map, `batch_z` and the batch's labels (the forward never updates
        them itself; `InterpretableCNN.update_statistics` does it for every layer)."""
        self.statistics_updates += 1
        z = global_log_mean_exp(batch_z, len(raw))
        unset = torch.isnan(self.log_mean_z)
        # a new tensor, not copy_: a compiled forward may have saved the old one for its backward
        self.log_mean_z = torch.where(unset, z, self._blend(self.log_mean_z.nan_to_num(0.0), z))
        if self.single_category is not None:
            return
        num_classes = self.class_activation.shape[1]
        classes = torch.arange(num_classes, device=labels.device)
        one_hot = (labels[:, None] == classes).float()  # (B, C); F.one_hot reads the labels' range on the host
        peak = raw.detach().flatten(2).amax(-1).float()  # (B, F)
        with torch.autocast(labels.device.type, enabled=False):  # float32 sums, not a bf16 matmul under autocast
            sums = all_reduce_(one_hot.t() @ peak)  # (C, F)
        counts = all_reduce_(one_hot.sum(0))  # (C,)
        present = counts > 0
        mean = (sums / counts.clamp(min=1)[:, None]).t()  # (F, C)
        momentum = torch.where(self.class_seen, self.category_momentum, 0.0)  # first sighting: take the mean
        updated = momentum * self.class_activation + (1 - momentum) * mean
        self.class_activation.copy_(torch.where(present[None, :], updated, self.class_activation))
        self.class_seen |= present
        if self.category_assignment == "argmax":
            self.filter_category.copy_(self.class_activation.argmax(1))
        else:
            self._queue_balanced_assignment()
            if not self._solved:  # the first step: its loss must not run on the initial categories (all class 0)
                self.refresh_categories()

    def _queue_balanced_assignment(self) -> None:
        """Start the class shares' trip to the host for the next `refresh_categories` (non-blocking on a GPU)."""
        share = self.class_activation / self.class_activation.sum(1, keepdim=True).clamp(min=1e-12)  # (F, C)
        on_device = share.device.type != "cpu"
        host = share.to("cpu", torch.float64, non_blocking=on_device)  # pinned when it comes from a GPU
        event = torch.cuda.Event() if share.device.type == "cuda" else None
        if event is not None:
            event.record()
        self._queued_share = (host, event)

    def discard_queued(self) -> None:
        """Forget the queued class shares (a skipped batch's: its statistics were undone, its solve must not run)."""
        self._queued_share = None

    def refresh_categories(self) -> None:
        """Solve the queued balanced assignment, if any, into `filter_category` (one solve per training step)."""
        queued, self._queued_share = self._queued_share, None
        if queued is None:
            return
        share, event = queued  # (F, C) float64 on the host
        if event is not None:
            event.synchronize()  # the previous step's copy; the device is already further on
        if not np.isfinite(share.numpy()).all():  # a diverged step (read on the host: no aten op, no device wait): keep the categories; the loss check names the step
            return
        filters, classes = share.shape
        slots = torch.arange(math.ceil(filters / classes) * classes) % classes  # each class repeated
        rows, cols = linear_sum_assignment(-share[:, slots].numpy())
        category = torch.empty(filters, dtype=torch.long)
        category[torch.as_tensor(rows)] = slots[torch.as_tensor(cols)]
        if self.filter_category.device.type == "cuda":
            category = category.pin_memory()
        self.filter_category.copy_(category, non_blocking=True)
        self._solved = True

    def check_classes(self, num_classes: int) -> None:
        """Refuse `num_classes` classes where single-category mode's class is none of them (`reset_classes` would)."""
        if self.single_category is not None and not 0 <= self.single_category < num_classes:
            raise ValueError(f"single_category {self.single_category} is no class id of a {num_classes}-class head; "
                             f"give a head of more than {self.single_category} classes, or create the model anew "
                             f"with a single_category in [0, {num_classes}).")

    def reset_classes(self, num_classes: int) -> None:
        """Start the category statistics afresh for `num_classes` classes (a new head: `reset_classifier`)."""
        self.check_classes(num_classes)
        filters, device = len(self.filter_category), self.filter_category.device
        self.class_activation = torch.zeros(filters, num_classes, device=device, dtype=self.class_activation.dtype)
        self.class_seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
        self.filter_category.fill_(self.single_category or 0)
        self._queued_share, self._solved = None, False

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self.refresh_categories()  # a checkpoint holds the categories its statistics give (resume is exact)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        # a state with class statistics holds their solved categories (see _save_to_state_dict); one read, at load
        self._queued_share, self._solved = None, bool(self.class_seen.any())


class InterpretableCNN(PooledHeadMixin, nn.Module):
    """Backbone (top stage interpretable) -> added 3x3 conv + ReLU (interpretable) -> pooled linear head.

    `masks=False` leaves both layers ordinary (no part masks): with lambda = 0 that is the paper's baseline, the
    same network with traditional conv layers; with masks and lambda = 0 it is the architecture-only ablation.

    Training outside `ICNNSystem` (a plain PyTorch loop): the forward does not update the filters' statistics (the
    category of each filter and the running Z_T); call `update_statistics` after each training forward, as
    `ICNNSystem.update_state` does, or every filter stays a class-0 part detector and Z_T is only the batch's::

        loss_fn = FilterPartLoss()
        for epoch in range(epochs):
            loss_fn.set_epoch(epoch)
            for batch in loader:
                out = model(batch["image"])
                model.update_statistics(out, batch)  # before the loss: the first step's categories are solved
                loss = sum(loss_fn(out, batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    A model whose first `STATISTICS_CHECK_FORWARDS` grad-enabled training forwards (eager ones: a compiled forward
    is not counted) came without any `update_statistics` warns once.
    """

    STATISTICS_CHECK_FORWARDS = 2  # the second training step without statistics is evidence enough: warn then

    def __init__(
        self,
        *,
        backbone: str = TINY_CNN,
        num_classes: int = 10,
        in_chans: int = 3,
        image_size: int = 64,
        added_filters: int | None = None,
        beta: float = 4.0,
        tau_scale: float = 1.0,
        learn_beta: bool = False,
        mu: str = "argmax",
        single_category: int | None = None,
        category_assignment: str = "argmax",
        category_momentum: float = 0.9,
        z_momentum: float = 0.1,
        masks: bool = True,
        drop_rate: float = 0.0,
        pretrained_path: str | Path | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if added_filters == 0 and not isinstance(added_filters, bool):  # a checkpoint of before 0 was refused
            warnings.warn("added_filters=0 builds as many added filters as the backbone's top stage has, as None does "
                          "(how checkpoints written with 0 were built): give None for a new run; a run resumed from a "
                          "checkpoint that holds 0 keeps 0.", stacklevel=2)
            added_filters = None
        if added_filters is not None and not positive_int(added_filters):
            raise ValueError(f"added_filters (the added conv layer's filters) must be an integer >= 1, or None for as "
                             f"many as the backbone's top stage has; got {added_filters!r}.")
        self.num_classes = num_classes
        self.backbone = Backbone(backbone, in_chans=in_chans, out_indices=(top_conv_index(backbone),),
                                 pretrained_path=pretrained_path, frozen=freeze_backbone)
        top_filters = self.backbone.num_features
        added = top_filters if added_filters is None else added_filters
        map_size = self._top_map_size(in_chans, image_size)
        kw = dict(beta=beta, tau_scale=tau_scale, learn_beta=learn_beta, mu=mu, single_category=single_category,
                  category_assignment=category_assignment,
                  category_momentum=category_momentum, z_momentum=z_momentum, masks=masks)
        self.top_filters = InterpretableFilters(top_filters, num_classes, map_size, **kw)
        self.added_conv = nn.Conv2d(top_filters, added, 3, padding=1)
        self.added_filters = InterpretableFilters(added, num_classes, map_size, **kw)
        self.head = PooledLinearHead(added, num_classes, drop_rate)
        self._forwards_to_check = self.STATISTICS_CHECK_FORWARDS  # see _check_statistics_updated

    @torch.no_grad()
    def _top_map_size(self, in_chans: int, image_size: int) -> tuple[int, int]:
        """The top conv map's (h, w) for `image_size` images, by a dry run; an image too small for the backbone (its
        maps shrink below 1 x 1 before the top stage: torch's pooling error named neither) is refused by name."""
        with eval_mode(self.backbone):
            try:
                size = self.backbone(torch.zeros(1, in_chans, image_size, image_size))[-1].shape[-2:]
            except RuntimeError as error:
                if "too small" not in str(error):
                    raise
                stride = self.backbone.reductions[-1]  # the top map's cell, in input pixels
                raise ValueError(f"image_size {image_size} is too small for backbone {self.backbone.name!r}: its "
                                 f"maps shrink below 1 x 1 before the top conv stage, whose cells are {stride} pixels "
                                 f"({error}). Give larger images (--data.init_args.image_size).") from error
        return tuple(size)

    def check_reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """The head's checks and every layer's (single_category must be a class of the new head), all before any
        change: a refused reset leaves head, class count and filter statistics as they were."""
        super().check_reset_classifier(num_classes, global_pool)
        for module in self.interpretable_layers():
            module.check_classes(num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's head swap; the filters' category statistics start afresh over the new classes too."""
        super().reset_classifier(num_classes, global_pool)  # checks everything first (`check_reset_classifier`)
        for module in self.interpretable_layers():
            module.reset_classes(num_classes)

    def interpretable_layers(self) -> list[InterpretableFilters]:
        return [self.top_filters, self.added_filters]

    def forward_interpretable(self, x: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        top = self.backbone(x)[-1]
        masked_top, top_out = self.top_filters(top)
        features, added_out = self.added_filters(self.added_conv(masked_top))
        return features, [top_out, added_out]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_interpretable(x)[0]

    def forward(self, x: torch.Tensor) -> dict:
        # is_compiling() first: dynamo folds it and never reads (nor guards on) the Python counter
        if not torch.compiler.is_compiling() and self.training and self._forwards_to_check:
            self._check_statistics_updated()
        features, layers = self.forward_interpretable(x)
        return {
            "logits": self.forward_head(features),
            "features": features,
            "filter_maps": layers[-1]["raw"],
            "masked_filter_maps": layers[-1]["masked"],
            "interpretable_maps": [layer["raw"] for layer in layers],
            "template_scores": [layer["scores"] for layer in layers],
            "log_mean_z": [layer["log_mean_z"] for layer in layers],
            "batch_z": [layer["batch_z"] for layer in layers],
            "filter_category": [module.filter_category for module in self.interpretable_layers()],
        }

    def _check_statistics_updated(self) -> None:
        """Count an eager grad-enabled training forward; at the `STATISTICS_CHECK_FORWARDS`-th, warn (once) if no
        `update_statistics` came yet. Python counters only: no device read, nothing in a compiled graph, nothing
        after the check (one integer test per step). Forwards without grad (BN recalibration) are no training
        steps."""
        if not torch.is_grad_enabled():
            return
        self._forwards_to_check -= 1
        if self._forwards_to_check == 0 and not any(m.statistics_updates for m in self.interpretable_layers()):
            warnings.warn(
                f"InterpretableCNN: {self.STATISTICS_CHECK_FORWARDS} training forwards and no call of "
                f"`update_statistics` yet: the filters' categories and the running Z_T of the filter loss are updated "
                f"only by it, so every filter stays a class-0 part detector and Z_T is only the current batch's. In a "
                f"plain training loop call `model.update_statistics(out, batch)` after each training forward "
                f"(`ICNNSystem` does it for you); see the InterpretableCNN docstring. Training forwards that are no "
                f"training steps may ignore this.", UserWarning, stacklevel=2)

    def update_statistics(self, out: dict, batch: dict[str, torch.Tensor], target_key: str = "label") -> None:
        """Update every interpretable layer's Z_T and filter categories from a training forward's `out` and the
        batch's labels `batch[target_key]`. Call it after each training forward, before the loss (never in eval):
        `ICNNSystem.update_state` does; a plain PyTorch loop must (see the class docstring), as the forward itself
        never updates them and the filter loss would otherwise treat every filter as a class-0 part detector."""
        for module, raw, batch_z in zip(self.interpretable_layers(), out["interpretable_maps"], out["batch_z"]):
            module.update_statistics(raw, batch_z, batch[target_key])

    def refresh_categories(self) -> None:
        """Solve every layer's queued balanced assignment (see `InterpretableFilters`); forward does it too."""
        for module in self.interpretable_layers():
            module.refresh_categories()

    def discard_queued(self) -> None:
        """Forget every layer's queued balanced assignment (a skipped batch's, see `ZooSystem.on_skipped_batch`)."""
        for module in self.interpretable_layers():
            module.discard_queued()



def _create_icnn(backbone: str, **kwargs) -> InterpretableCNN:
    return InterpretableCNN(backbone=backbone, **kwargs)


@register_model
@input_size_aware
def icnn_tinycnn(**kwargs) -> InterpretableCNN:
    """Interpretable CNN on the tiny CNN (8x8 top maps at 64x64), the CPU default."""
    return _create_icnn(TINY_CNN, **kwargs)


@register_model
@input_size_aware
def icnn_resnet18(**kwargs) -> InterpretableCNN:
    """Interpretable CNN on timm resnet18's last stage (TPAMI placement for residual nets)."""
    return _create_icnn("resnet18", **kwargs)


@register_model
@input_size_aware
def icnn_vgg11(**kwargs) -> InterpretableCNN:
    """Interpretable CNN on timm vgg11's top conv layer."""
    return _create_icnn("vgg11", **kwargs)


@register_model
@input_size_aware
def icnn_vgg16(**kwargs) -> InterpretableCNN:
    """Interpretable CNN on timm vgg16's top conv layer (the paper's main network)."""
    return _create_icnn("vgg16", **kwargs)


@register_model
@input_size_aware
def icnn_timm(backbone: str = "resnet18", **kwargs) -> InterpretableCNN:
    """Interpretable CNN on any timm CNN by name: ``create_model("icnn_timm", backbone="convnext_atto")``."""
    return _create_icnn(backbone, **kwargs)

"""The ProtoPNet System: push at the start of the stages that ask for it, prototype part metrics, TWINS."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.seed import isolate_rng
from torchmetrics.classification import MulticlassAccuracy

from zoo.backbones import model_map_geometry
from zoo.checks import batch_field
from zoo.engine import ZooSystem
from zoo.engine.callbacks import precision_input
from zoo.protopnet.metrics import PartConsistency, image_noise
from zoo.protopnet.model import similarity
from zoo.protopnet.push import apply_push, keep_nearest, nearest_patches, push_loader, push_source


def top_class_prototypes(out: dict[str, torch.Tensor], predicted: torch.Tensor,
                         k: int) -> torch.return_types.topk:
    """The evidence an image's prediction rests on, as predictions.csv (`ProtoPNetSystem.prediction_extras`) and the
    prototype picture (`PrototypesCallback`) show it: for each image the predicted class's own prototypes
    (`prototype_class == predicted`) ranked by similarity x last-layer weight for that class, best first, at most
    `k` (min(k, m) for m prototypes per class: other classes' prototypes, with their negative -0.5 connections,
    never fill the list). `out` is a ProtoPNet's output (`min_distances` (B, P), `last_layer_weight` (C, P),
    `prototype_class` (P,)); `predicted` (B,). Returns topk's (values, indices), each (B, min(k, m)), in float32."""
    owner = out["prototype_class"]  # (P,)
    evidence = similarity(out["min_distances"]).float() * out["last_layer_weight"].float()[predicted]  # (B, P)
    own = owner[None, :] == predicted[:, None]  # (B, P)
    per_class = torch.bincount(owner, minlength=out["last_layer_weight"].shape[0])  # (C,) every class owns m
    count = min(k, int(per_class.min()))  # (one host read)
    return evidence.masked_fill(~own, float("-inf")).topk(count, dim=1)  # (B, count)


class ProtoPNetSystem(ZooSystem):
    """Train ProtoPNet (`protopnet_*`) through the engine's stages, as the paper's schedule (configs/protopnet/):

    - "warm_up": add-on layers and prototypes only (backbone frozen), loss_task + loss_cluster + loss_separation;
    - "joint": everything but the last layer, the same terms;
    - "last_layer": push first (each prototype replaced by the nearest latent patch of a training image of its
      class, `zoo.protopnet.push`), then only the last layer, loss_task + loss_l1.
    Push runs at the first epoch of every stage named in `push_stages` (so joint / last_layer pairs can repeat, as
    the paper's push every 10 epochs); logged as push/distance (mean distance from prototype to its patch before the
    push) and push/pushed (the share of prototypes moved).

    Logged: `<stage>/acc`; on images with part masks (validation, test) `<stage>/part_consistency`,
    `part_stability`, `part_purity` and `part_iou` (`PartConsistency`) of each class's units: its prototypes, or for
    a twin the m top-map channels of largest head weight for the class.

    Predictions (`train.py predict`): predictions.csv names each image's top prototypes for its predicted class, with
    their classes, scores and push sources (`prediction_extras`).

    Twins (`train.py compare --config configs/protopnet/<x>.yaml`): "linear_head", the same backbone with a pooled
    linear head, and "add_on_linear_head", the same with the add-on layers; both train every epoch end to end with
    cross-entropy (the prototype terms are zero for them).

    Args:
        push_stages: names of the stages that start with a push.
        stability_noise: std of the Gaussian noise added to the images for the stability score (0: no score; Huang
            et al.: 0.2). It is added to the images as the model takes them: in the normalised space where the data
            module normalises (CUB with `mean: pretrained`, as Huang et al.'s normalised images), in [0, 1] pixels
            where it does not (the parts world's default). An image's noise is a function of its data set index
            (`batch["index"]`, `image_noise`), so the score is the same on any number of processes and for any batch
            size; batches without indices draw it from one generator reseeded at each validation / test epoch (then
            it follows the batch order).
        stability_noise_clip: the noise is clipped to [-clip, clip] (Huang et al.: 0.25, "imperceptible"); None:
            not clipped.
        part_quantile: the activated region of a unit is the top 1 - part_quantile of its upsampled map.
    """

    PREDICT_PROTOTYPES: ClassVar[int] = 3  # the prototypes predictions.csv names per image (`prediction_extras`)
    TWINS: ClassVar[dict[str, list[str]]] = {
        "linear_head": ["--model.init_args.model_kwargs.head=linear", "--model.init_args.model_kwargs.add_on=false",
                        "--model.init_args.stages=null"],
        "add_on_linear_head": ["--model.init_args.model_kwargs.head=linear",
                               "--model.init_args.model_kwargs.add_on=true", "--model.init_args.stages=null"],
    }

    def __init__(self, model_name: str = "protopnet_tinycnn", *args: Any, push_stages: list[str] | None = None,
                 stability_noise: float = 0.2, stability_noise_clip: float | None = 0.25, part_quantile: float = 0.95,
                 **kwargs: Any) -> None:
        super().__init__(model_name, *args, **kwargs)
        self.push_stages = ["last_layer"] if push_stages is None else list(push_stages)
        names = {stage.name for stage in self.schedule.stages}
        unknown = set(self.push_stages) - names
        if unknown and self.schedule.staged:
            raise ValueError(f"push_stages names {sorted(unknown)}, which are not stages of this run "
                             f"({sorted(names)}).")
        if stability_noise < 0:
            raise ValueError(f"stability_noise must be >= 0; got {stability_noise}.")
        if stability_noise_clip is not None and stability_noise_clip <= 0:
            raise ValueError(f"stability_noise_clip must be > 0 or null (no clip); got {stability_noise_clip}.")
        self.stability_noise, self.stability_noise_clip = stability_noise, stability_noise_clip
        self.add_metric("acc", MulticlassAccuracy(self.hparams.num_classes, average="micro"),
                        stages=("train", "val", "test"))
        self.add_metric("parts", PartConsistency(self.model.num_units, quantile=part_quantile), log_prefix="part_")
        self._noise: torch.Generator | None = None

    def build_model(self) -> torch.nn.Module:
        """The registry's model, refused by name unless it is a ProtoPNet (`protopnet_*`; the linear-head twins are
        too: `head: linear`), before anything reads its units."""
        model = super().build_model()
        if not (hasattr(model, "num_units") and hasattr(model, "has_prototypes")):
            raise ValueError(f"ProtoPNetSystem needs a ProtoPNet model (protopnet_*); got {self.hparams.model_name} "
                             f"({type(model).__name__}, no prototype units). Give model_name: protopnet_tinycnn (or "
                             f"another protopnet_*; model_kwargs head: linear for the linear-head twin), or train a "
                             f"plain classifier with zoo.baselines.system.ClassifierSystem.")
        return model

    def default_loss(self) -> torch.nn.Module:
        from losses.protopnet import ProtoPNetLoss

        return ProtoPNetLoss(target_key=self.target_key)

    # ------------------------------------------------------------------------------------------------- push
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.warn_without_push()

    def warn_without_push(self) -> None:
        """Warn (once, rank zero) when a model with prototypes is fitted with no push: no prototype would be pushed
        onto a training patch, so its prototypes stay latent vectors that no image shows (predictions.csv and the
        pictures say "not pushed", source -1). Either no stage of the run is in `push_stages` (a run without
        `stages:` has one stage, "all", and `push_stages` defaults to ["last_layer"]), or every stage in it starts
        at or after `trainer.max_epochs` (`Schedule.unreached`; the engine's own warning says only that those stages
        never train; not under fast_dev_run, which may stop anywhere, as the engine's). An explicit
        `push_stages=[]` (training without push on purpose) and the linear-head twins say nothing."""
        names = [stage.name for stage in self.schedule.stages]
        if not self.push_stages or not self.model.has_prototypes:
            return
        pushing = list(dict.fromkeys(name for name in names if name in self.push_stages))  # once each, in order
        if not pushing:
            rank_zero_warn(f"ProtoPNetSystem: no stage of this run ({names}) is in push_stages={self.push_stages}, so "
                           f"no prototype is ever pushed onto a training patch. Give the paper's stages (warm_up, "
                           f"joint, last_layer, as configs/protopnet/parts_world.yaml) or name the stages that push "
                           f"in push_stages; push_stages=[] trains without push on purpose (and says nothing).")
            return
        max_epochs = self.trainer.max_epochs
        unreached = {id(stage) for stage in self.schedule.unreached(max_epochs)}  # by identity: names can repeat
        reached = [stage for stage in self.schedule.stages if id(stage) not in unreached]
        if self.trainer.fast_dev_run or any(stage.name in self.push_stages for stage in reached):
            return
        stages = [(stage.name, stage.epochs) for stage in self.schedule.stages]
        at = next(i for i, stage in enumerate(self.schedule.stages) if stage.name in self.push_stages)
        first = sum(int(stage.epochs) for stage in self.schedule.stages[:at])  # the epoch of the first push
        rank_zero_warn(f"ProtoPNetSystem: max_epochs={max_epochs} ends before the push stage(s) {pushing} start "
                       f"(stages: {stages}, push_stages={self.push_stages}): no prototype is pushed onto a training "
                       f"patch in this fit, so the prototypes stay latent vectors that no image shows (source -1 in "
                       f"predictions.csv and the pictures). Give max_epochs more than {first} (the first push is at "
                       f"epoch {first}, counting from 0), or resume this run with a larger max_epochs to push.")

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        schedule = self.schedule
        first_epoch = self.current_epoch == 0 or schedule.stage_at(self.current_epoch - 1) != schedule.index
        if first_epoch and schedule.current.name in self.push_stages and self.model.has_prototypes:
            self.push()

    def push(self) -> torch.Tensor:
        """Push every prototype onto its nearest training patch (of the training images without augmentation,
        `push_source`; every process, the same result under DDP); returns each prototype's distance to its patch
        before the push, (P,)."""
        trainer = self.trainer
        dataset, source = push_source(trainer)  # the training images without augmentation
        loader, indices = push_loader(dataset, source.batch_size or 64, source.collate_fn, trainer.world_size,
                                      trainer.global_rank)
        self.model.eval()
        try:
            with isolate_rng():  # iterating a loader draws a seed: keep the run's random stream as it was
                found = nearest_patches(self.model, loader, indices, self.input_key, self.target_key, self.device,
                                        partial(precision_input, trainer))  # the images in the run's precision
        finally:
            self.train(self.training)
        found = keep_nearest(found, self.all_gather, trainer.world_size)
        image_size = self.hparams.image_size
        geometry = model_map_geometry(self.model, image_size) if image_size else None
        apply_push(self.model, found, (image_size or 1, image_size or 1), geometry)
        pushed = torch.isfinite(found["distance"])
        self.log("push/distance", found["distance"][pushed].mean(), on_step=False, on_epoch=True)
        self.log("push/pushed", pushed.float().mean(), on_step=False, on_epoch=True)
        return found["distance"]

    # ---------------------------------------------------------------------------------------------- predict
    def prediction_extras(self, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """Each image's evidence for its predicted class, the model's explanation: a predictions.csv column
        `top_prototypes`, the predicted class's own prototypes of largest similarity x last-layer weight for it, at
        most `PREDICT_PROTOTYPES` (`top_class_prototypes`, as `PrototypesCallback` ranks them), best first,
        "; "-separated, each "p<id>:<class>:<score>:<source>": the prototype, the class that owns it (its name), its
        similarity x weight (4 significant digits) and the index of the training image push took it from (-1 before
        any push); and `top_prototypes` (B, k) their ids. The twins have no prototypes: nothing."""
        if not self.model.has_prototypes:
            return {}
        top = top_class_prototypes(out, out["logits"].argmax(-1), self.PREDICT_PROTOTYPES)  # (B, k)
        layer, names = self.model.prototypes, self.class_names
        owner, source = layer.prototype_class.tolist(), layer.source_index.tolist()  # predict only: host anyway
        cells = [[f"p{j}:{names[owner[j]]}:{score:.4g}:{source[j]}" for j, score in zip(ids, scores)]
                 for ids, scores in zip(top.indices.tolist(), top.values.tolist())]
        return {"top_prototypes": top.indices, "columns": {"top_prototypes": ["; ".join(row) for row in cells]}}

    # ------------------------------------------------------------------------------------------------ metrics
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._noise = torch.Generator(device=self.device).manual_seed(0)  # no indices: the same noise every epoch

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._noise = torch.Generator(device=self.device).manual_seed(0)

    @staticmethod
    def unit_maps_of(maps: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """The maps (B, m, h, w) of `units` (B, m) out of every unit's maps (B, U, h, w)."""
        height, width = maps.shape[-2:]
        return maps.gather(1, units[..., None, None].expand(-1, -1, height, width))

    def stability_noise_for(self, images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Standard Gaussian noise like `images` (B, C, H, W) for the stability score: each image's from its data set
        index where the batch has one (`image_noise`), else from the epoch's generator; the global stream kept."""
        if "index" in batch:
            return image_noise(batch["index"], tuple(images.shape[1:]), device=images.device).to(images.dtype)
        generator = self._noise or torch.Generator(device=images.device).manual_seed(0)
        return torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)

    def update_metrics(self, out: dict[str, Any], batch: dict[str, Any], stage: str) -> None:
        super().update_metrics(out, batch, stage)
        if stage == "train" or "part_masks" not in batch:
            return
        units = self.model.class_units()[batch[self.target_key]]  # (B, m) the units of each image's class
        maps = self.unit_maps_of(out["unit_maps"].detach(), units)
        images, masks = batch_field(batch, self.input_key), batch["part_masks"]
        noisy = None
        if self.stability_noise > 0:
            noise = self.stability_noise * self.stability_noise_for(images, batch)  # (B, C, H, W)
            if self.stability_noise_clip is not None:
                noise = noise.clamp(-self.stability_noise_clip, self.stability_noise_clip)
            noisy = self.unit_maps_of(self.model(images + noise)["unit_maps"], units)
        geometry = model_map_geometry(self.model, images.shape[-2:])  # the cells at their receptive-field centres
        if geometry is not None and masks.shape[-2:] != images.shape[-2:]:
            geometry = geometry.resized(images.shape[-2:], masks.shape[-2:])
        self.log_metric(stage, "parts", maps, units, masks, batch["part_types"], noisy, geometry)

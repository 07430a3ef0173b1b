"""Lightning systems: a registered model plus a loss module; the loss dict is summed, every term is logged.

Imported on demand (``from zoo.systems import ClassificationSystem``) so that `import zoo` needs no Lightning.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from losses.baselines import ClassificationLoss
from zoo.textual.metrics import as_text
from zoo.icnn.metrics import LocationInstability, PartIoU
from zoo.l2x.metrics import AgreementAccuracy, MedianRank, SelectionRecovery
from zoo.distributed import all_reduce_
from zoo.registry import create_model_for_data
from zoo.weights import read_checkpoint

STAGES = ("train", "val", "test")


def check_checkpoint_fits(system: pl.LightningModule, checkpoint: dict[str, Any], source: str = "the checkpoint"
                          ) -> None:
    """Refuse, naming the difference, a checkpoint of another model / class count / channel count than `system`
    (before Lightning's load_state_dict fails deep inside torch)."""
    from zoo.weights import check_same_model, model_spec

    saved = checkpoint.get("hyper_parameters")
    if isinstance(saved, dict) and "model_name" in saved:
        check_same_model(model_spec(saved), {k: system.hparams.get(k) for k in ("model_name", "num_classes",
                                                                                  "in_chans")}, source)


def fit_frozen_module(module: nn.Module, trainer: pl.Trainer, batch_loss: Any, epochs: int, lr: float) -> None:
    """Train `module` outside the Trainer's optimiser (a black box, an evaluator, an encoder, a reward model) on
    the datamodule's training split with Adam, then freeze it; under DDP every rank keeps rank 0's weights.

    `batch_loss(batch) -> loss` computes the loss of one training batch."""
    module.requires_grad_(True).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in trainer.datamodule.train_dataloader():
                loss = batch_loss(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    module.requires_grad_(False)


def load_module_weights(module: nn.Module, path: str, prefix: str, what: str) -> None:
    """Weights for `module` from a state dict, safetensors file or Lightning checkpoint, whose keys carry `prefix`
    (e.g. "black_box." in a SelectorSystem checkpoint) or not (a plain state dict, a ClassificationSystem's
    "model."-prefixed one); missing or mis-shaped weights raise CheckpointError naming `what`."""
    from zoo.weights import CheckpointError, match_state_dict, read_state_dict

    state = read_state_dict(path)
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    matched, missing, _ = match_state_dict(own or state, list(module.state_dict()))
    if missing:
        raise CheckpointError(f"{path!r} does not hold weights for the {what} ({type(module).__name__}): missing "
                              f"{missing[:8]}.")
    try:
        module.load_state_dict(matched)
    except RuntimeError as err:
        raise CheckpointError(f"{path!r} does not fit the {what} ({type(module).__name__}): {err}") from err


def check_class_ids(labels: torch.Tensor, num_classes: int) -> None:
    """Labels must lie in [0, num_classes): a clear error instead of an index error inside the loss (CPU only,
    where the check costs no device synchronisation)."""
    if labels.device.type == "cpu" and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"The batch's labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}): "
                         f"num_classes does not match the data.")


def batch_field(batch: dict[str, Any], key: str) -> Any:
    """`batch[key]` with an error that lists what the batch does hold; float fields must be finite."""
    if not isinstance(batch, dict):
        raise TypeError(f"Batches must be dicts of tensors; got {type(batch).__name__}.")
    if key not in batch:
        raise KeyError(f"The batch has no {key!r}; it holds {sorted(batch)}. Set input_key/target_key to match.")
    value = batch[key]
    # Checked where it costs nothing (CPU); on an accelerator a NaN input surfaces as the non-finite-loss error.
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == "cpu"
            and not torch.isfinite(value).all()):
        bad = (~torch.isfinite(value.flatten(1) if value.ndim > 1 else value[:, None])).any(1).nonzero().flatten()
        index = batch.get("index")
        where = f"dataset indices {index[bad].tolist()[:8]}" if isinstance(index, torch.Tensor) else \
            f"batch positions {bad.tolist()[:8]}"
        raise ValueError(f"The batch's {key!r} holds NaN or inf values ({where}); fix or filter those samples.")
    return value


class EvaluationHooks:
    """Lightning's validation/test hooks for Systems that score a batch with `_evaluate(batch, stage)` and log
    epoch-level metrics with `_log_epoch_metrics(stage)` (selectors, explanation models, detectors)."""

    def _evaluate(self, batch: Any, stage: str) -> None:
        raise NotImplementedError

    def _log_epoch_metrics(self, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")


class ClassificationSystem(pl.LightningModule):
    """Train any registered classifier with a named-terms loss, accuracy per stage, optimiser from the config.

    Args:
        model_name: registry name, e.g. "baseline_tinycnn".
        num_classes: linked from the datamodule by the CLI.
        in_chans: image channels, linked from the datamodule by the CLI (None for data that is not images).
        data_inputs: what else the data fixes about the model's input (num_features, vocab_size), linked by the CLI.
        model_kwargs: extra keyword arguments for `zoo.create_model` (they win over the linked ones).
        loss: module returning named loss terms; default: cross-entropy as "loss_task".
        optimizer / scheduler: callables injected by LightningCLI (``optimizer: {class_path: torch.optim.SGD}``).
        input_key / target_key: batch fields fed to the model and to the accuracy.
        part_maps_key: model output scored for part interpretability in validation/test ("filter_maps" for ICNN,
            "features" for an opaque twin): location instability where the batch has landmarks, part IoU where it
            has part masks. None skips them.
        image_size: input side in pixels (linked from the datamodule): places map units in the image for the part
            metrics, and sizes models marked `input_size_aware` (unless model_kwargs sets it).
        nonfinite_loss: a NaN/inf training loss "raise"s `FloatingPointError` naming the step, the batch and every
            term (the last good checkpoint stays), or "skip"s the batch with a warning.
    """

    def __init__(
        self,
        model_name: str = "baseline_tinycnn",
        num_classes: int = 10,
        in_chans: int | None = 3,
        data_inputs: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        input_key: str = "image",
        target_key: str = "label",
        part_maps_key: str | None = None,
        image_size: int | None = 64,
        nonfinite_loss: str = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        self.model = create_model_for_data(model_name, num_classes, in_chans, image_size, data_inputs, model_kwargs)
        self.loss = loss if loss is not None else ClassificationLoss()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.input_key, self.target_key = input_key, target_key
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip'; got {nonfinite_loss!r}.")
        self.nonfinite_loss = nonfinite_loss
        # Keyed "<stage>_acc": a ModuleDict key "train" would shadow nn.Module.train.
        self.metrics = nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(num_classes, average="micro") for s in STAGES})
        self.part_maps_key = part_maps_key
        if part_maps_key is not None:
            for stage in ("val", "test"):
                self.metrics[f"{stage}_location_instability"] = LocationInstability(image_size or 0)
                self.metrics[f"{stage}_part_iou"] = PartIoU()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint)

    def _step(self, batch: dict[str, Any], stage: str, batch_idx: int = 0) -> torch.Tensor | None:
        images, labels = batch_field(batch, self.input_key), batch_field(batch, self.target_key)
        check_class_ids(labels, self.hparams.num_classes)
        out = self.model(images)
        if stage == "train" and hasattr(self.model, "update_statistics"):
            self.model.update_statistics(out, batch)  # online statistics (e.g. ICNN's Z_T, categories), never in eval
        terms = self._select_terms(self.loss(out, batch), stage)
        loss = torch.stack(list(terms.values())).sum()
        if stage == "train" and not torch.isfinite(loss):
            message = (f"Non-finite training loss at global step {self.global_step}, epoch {self.current_epoch}, "
                       f"batch {batch_idx}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            if self.nonfinite_loss == "raise":
                raise FloatingPointError(message + ". The last checkpoint is the last good state.")
            rank_zero_warn(message + "; batch skipped (nonfinite_loss='skip').")
            return None  # Lightning skips the optimiser step
        on_step = stage == "train"
        log_kw = dict(on_step=on_step, on_epoch=True, batch_size=len(labels), sync_dist=not on_step)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, **log_kw)
        self.log(f"{stage}/loss", loss, prog_bar=on_step, **log_kw)
        accuracy = self.metrics[f"{stage}_acc"]
        accuracy.update(out["logits"].detach(), labels)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        if stage != "train":
            self._update_eval_metrics(out, batch, stage)
        return loss

    def _select_terms(self, terms: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """The loss terms summed in this step (all of them; staged training narrows this)."""
        return terms

    def _update_eval_metrics(self, out: dict[str, torch.Tensor], batch: dict[str, Any], stage: str) -> None:
        if self.part_maps_key is not None:
            self._update_part_metrics(out[self.part_maps_key], batch, stage)

    def _update_part_metrics(self, maps: torch.Tensor, batch: dict[str, Any], stage: str) -> None:
        if "landmarks" in batch:
            metric = self.metrics[f"{stage}_location_instability"]
            metric.update(maps, batch["landmarks"], batch.get("landmark_visible"), batch.get(self.target_key))
            self.log(f"{stage}/location_instability", metric, on_step=False, on_epoch=True)
        if "part_masks" in batch:
            metric = self.metrics[f"{stage}_part_iou"]
            metric.update(maps, batch["part_masks"], batch.get("part_types"))
            self.log(f"{stage}/part_iou", metric, on_step=False, on_epoch=True)

    def filter_part_scores(self) -> torch.Tensor | None:
        """This validation epoch's per-filter part hit rates (F, K): which filter means what. A collective call
        under DDP (every rank must make it); None without part metrics or before any validation batch."""
        metric = self.metrics["val_part_iou"] if self.part_maps_key is not None else None
        if metric is None or metric.update_count == 0:
            return None
        with metric.sync_context(should_sync=self.trainer.world_size > 1):
            return metric.part_scores()

    def on_train_epoch_start(self) -> None:
        """Loss schedules (e.g. ICNN's lambda / epoch) step here and are logged."""
        if hasattr(self.loss, "set_epoch"):
            for name, value in self.loss.set_epoch(self.current_epoch).items():
                self.log(f"schedule/{name}", value, on_step=False, on_epoch=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.model(batch_field(batch, self.input_key))
        probs = out["logits"].softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1), **({"index": batch["index"]} if "index" in batch else {})}

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


class SelectorSystem(EvaluationHooks, pl.LightningModule):
    """Train an amortised feature selector (L2X, INVASE) to explain a frozen black box.

    Before the selector's first step the black box is loaded (`black_box_checkpoint`: a state dict, safetensors
    file or Lightning checkpoint of a ClassificationSystem or SelectorSystem) or trained on the training split for
    `black_box_epochs`, then frozen. An EVAL-X evaluator (same architecture, trained on inputs with features kept
    at random with probability 0.5, Jethani et al. 2021) is prepared the same way; it scores explanations without
    having co-adapted with the selector. Both live in the checkpoint, so a resumed run does not retrain them.

    Logged in validation/test: `acc` = post-hoc accuracy (black box on the selected input agrees with the black
    box on the full input; so checkpointing on val/acc keeps the most faithful selector), `evalx_acc`,
    `approximator_fidelity` (the selector's own approximator agrees with the black box), `black_box_acc`, and where
    the batch has ground truth (`relevant_key`): `median_rank`, `tpr`, `fdr`, `num_selected`.

    Args:
        model_name: a registered selector (`l2x_vector`, `l2x_patches`, `l2x_tokens`, `invase_*`).
        black_box: registered classifier to explain; built with the same data inputs.
        aux_lr: Adam learning rate for the black box and evaluator.
        loss: default `L2XLoss` for L2X, `INVASELoss` for INVASE.
    """

    def __init__(
        self,
        model_name: str = "l2x_vector",
        num_classes: int = 2,
        in_chans: int | None = None,
        image_size: int | None = None,
        data_inputs: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        loss: nn.Module | None = None,
        black_box: str = "baseline_mlp",
        black_box_kwargs: dict[str, Any] | None = None,
        black_box_checkpoint: str | None = None,
        black_box_epochs: int = 10,
        evaluator_checkpoint: str | None = None,
        evaluator_epochs: int = 10,
        aux_lr: float = 1e-3,
        optimizer: OptimizerCallable = torch.optim.Adam,
        input_key: str = "features",
        target_key: str = "label",
        relevant_key: str = "relevant",
    ) -> None:
        super().__init__()
        from losses.l2x import INVASELoss, L2XLoss
        from zoo.l2x.model import L2X

        self.save_hyperparameters(ignore=["loss", "optimizer"])
        self.model = create_model_for_data(model_name, num_classes, in_chans, image_size, data_inputs, model_kwargs)
        if not hasattr(self.model, "mask_input"):
            raise ValueError(f"{model_name!r} is not a feature selector (no mask_input); use an l2x_* or invase_* "
                             f"model, or ClassificationSystem for classifiers.")
        self.black_box = create_model_for_data(black_box, num_classes, in_chans, image_size, data_inputs, black_box_kwargs)
        self.evaluator = create_model_for_data(black_box, num_classes, in_chans, image_size, data_inputs, black_box_kwargs)
        for frozen in (self.black_box, self.evaluator):  # never trained by the Trainer (nor wrapped by DDP)
            frozen.requires_grad_(False)
        self.register_buffer("black_box_ready", torch.tensor(False))
        self.register_buffer("evaluator_ready", torch.tensor(False))
        for name, path in (("black_box", black_box_checkpoint), ("evaluator", evaluator_checkpoint)):
            if path is not None:
                load_module_weights(getattr(self, name), path, f"{name}.", name)
                getattr(self, f"{name}_ready").fill_(True)
        self.loss = loss if loss is not None else (L2XLoss() if isinstance(self.model, L2X) else INVASELoss())
        self.optimizer_factory = optimizer
        self.input_key, self.target_key, self.relevant_key = input_key, target_key, relevant_key
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            for name in ("acc", "evalx_acc", "approximator_fidelity", "black_box_acc"):
                self.metrics[f"{stage}_{name}"] = AgreementAccuracy()
            self.metrics[f"{stage}_median_rank"] = MedianRank()
            self.metrics[f"{stage}_recovery"] = SelectionRecovery()

    # -- the frozen black box and evaluator
    def _fit_auxiliary(self, name: str, epochs: int, random_masks: bool) -> None:
        """Train the black box (or, with random masks, the EVAL-X evaluator) on the training split, then freeze."""
        module: nn.Module = getattr(self, name)

        def batch_loss(batch: dict[str, Any]) -> torch.Tensor:
            x, y = batch_field(batch, self.input_key).to(self.device), batch_field(batch, self.target_key)
            if random_masks:
                keep = torch.rand(len(x), self.model.num_features, device=self.device).round()  # (B, d)
                x = self.model.mask_input(x, keep)
            return F.cross_entropy(module(x)["logits"], y.to(self.device))

        fit_frozen_module(module, self.trainer, batch_loss, epochs, self.hparams.aux_lr)
        getattr(self, f"{name}_ready").fill_(True)

    def prepare_frozen_models(self) -> None:
        """Train whatever is not loaded yet (black box first: the evaluator needs no black box, L2X does)."""
        if not self.black_box_ready:
            self._fit_auxiliary("black_box", self.hparams.black_box_epochs, random_masks=False)
        if not self.evaluator_ready and self.hparams.evaluator_epochs > 0:
            self._fit_auxiliary("evaluator", self.hparams.evaluator_epochs, random_masks=True)
        for module in (self.black_box, self.evaluator):
            module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "SelectorSystem":
        super().train(mode)
        self.black_box.eval()  # frozen: BatchNorm/dropout stay in inference mode while the selector trains
        self.evaluator.eval()
        return self

    def on_fit_start(self) -> None:
        self.prepare_frozen_models()

    def on_validation_start(self) -> None:
        if not self.black_box_ready:
            raise RuntimeError("The black box is neither trained nor loaded: run fit, pass black_box_checkpoint, or "
                               "load a SelectorSystem checkpoint.")

    on_test_start = on_predict_start = on_validation_start

    # -- steps
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint)

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.black_box(x)["logits"].float()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch_field(batch, self.input_key)
        teacher_probs = self._teacher_logits(x).softmax(-1)
        terms = self.loss(self.model(x), {**batch, "teacher_probs": teacher_probs})
        loss = torch.stack(list(terms.values())).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Non-finite selector loss at step {self.global_step}: "
                                     + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=len(x))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        x, y = batch_field(batch, self.input_key), batch_field(batch, self.target_key)
        teacher_logits = self._teacher_logits(x)
        out = self.model(x)  # eval mode: hard selection (exact top-k for L2X)
        terms = self.loss(out, {**batch, "teacher_probs": teacher_logits.softmax(-1)})
        self.log(f"{stage}/loss", torch.stack(list(terms.values())).sum(), batch_size=len(x), sync_dist=True)
        masked = self.model.mask_input(x, out["selection"])
        updates = {
            "acc": (self.black_box(masked)["logits"], teacher_logits),
            "approximator_fidelity": (out["logits"], teacher_logits),
            "black_box_acc": (teacher_logits, y),
            **({"evalx_acc": (self.evaluator(masked)["logits"], y)} if self.evaluator_ready else {}),
        }
        for name, (logits, target) in updates.items():
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(logits, target)
            self.log(f"{stage}/{name}", metric, on_epoch=True, prog_bar=name == "acc")
        if self.relevant_key in batch:
            self.metrics[f"{stage}_median_rank"].update(out["scores"], batch[self.relevant_key])
            self.metrics[f"{stage}_recovery"].update(out["selection"], batch[self.relevant_key])

    def _log_epoch_metrics(self, stage: str) -> None:
        median_rank, recovery = self.metrics[f"{stage}_median_rank"], self.metrics[f"{stage}_recovery"]
        if median_rank.update_count:
            self.log(f"{stage}/median_rank", median_rank.compute())
            self.log_dict({f"{stage}/{k}": v for k, v in recovery.compute().items()})
        median_rank.reset()
        recovery.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.model(batch_field(batch, self.input_key))
        return {"scores": out["scores"], "selection": out["selection"],
                **({"index": batch["index"]} if "index" in batch else {})}

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])


class StagedSystem(ClassificationSystem):
    """A ClassificationSystem trained in stages, each naming the submodules it trains and the loss terms it uses
    (ReNN: local detectors on the pattern loss; then global inference on the task loss with the detectors frozen;
    optionally both at a lower learning rate). The stage is chosen from the epoch, logged as `schedule/stage`,
    and its frozen submodules really get no update (requires_grad off, so the optimiser skips them).

    Args:
        stages: list of {name, epochs, train: [submodule names of the model], losses: [loss term names],
            lr_scale (default 1)}; epochs past the last stage stay in the last stage.
        rule_events_key: batch field with ground-truth rule events (B, R, T), scored against the model's
            `rule_map` (precision / recall per rule) in validation and test.
    """

    def __init__(self, *args: Any, stages: list[dict[str, Any]] | None = None,
                 rule_events_key: str = "rule_events", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from zoo.renn.metrics import RuleFiring

        self.stages = stages or [{"name": "all", "epochs": 1, "train": [n for n, _ in self.model.named_children()],
                                  "losses": None}]
        for stage in self.stages:
            unknown = set(stage.get("train", [])) - {n for n, _ in self.model.named_children()}
            if unknown:
                raise ValueError(f"stage {stage.get('name')!r} trains {sorted(unknown)}, which "
                                 f"{type(self.model).__name__} does not have; it has "
                                 f"{[n for n, _ in self.model.named_children()]}.")
        self.rule_events_key = rule_events_key
        rules = getattr(getattr(self.model, "rule_layer", None), "rule_names", None)
        self.rule_names = list(rules or [])
        if self.rule_names:
            for stage in ("val", "test"):
                self.metrics[f"{stage}_rule_firing"] = RuleFiring(len(self.rule_names))
        self.stage_index = 0

    def stage_at(self, epoch: int) -> int:
        end = 0
        for index, stage in enumerate(self.stages):
            end += int(stage["epochs"])
            if epoch < end:
                return index
        return len(self.stages) - 1

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.stage_index = self.stage_at(self.current_epoch)
        stage = self.stages[self.stage_index]
        for name, module in self.model.named_children():
            module.requires_grad_(name in stage.get("train", []))
        self.train(self.training)  # frozen submodules to eval mode (BatchNorm statistics stay put too)
        for group in self.optimizers(use_pl_optimizer=False).param_groups:
            # the unscaled rate lives in the param group, so it is saved with the optimiser and a run resumed
            # inside a scaled stage does not take the scaled rate for its base
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * float(stage.get("lr_scale", 1.0))
        self.log("schedule/stage", float(self.stage_index), on_step=False, on_epoch=True)

    def train(self, mode: bool = True) -> "StagedSystem":
        super().train(mode)
        if mode and hasattr(self, "stages"):
            trained = self.stages[self.stage_index].get("train", [])
            for name, module in self.model.named_children():
                if name not in trained:
                    module.eval()
        return self

    def configure_optimizers(self) -> Any:
        saved = [p.requires_grad for p in self.parameters()]
        self.requires_grad_(True)  # the optimiser holds every parameter; stages switch them on and off
        try:
            return super().configure_optimizers()
        finally:
            for p, flag in zip(self.parameters(), saved):
                p.requires_grad_(flag)

    def _select_terms(self, terms: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        wanted = self.stages[self.stage_index].get("losses") if stage == "train" else None
        return terms if wanted is None else {k: v for k, v in terms.items() if k in wanted}

    def _update_eval_metrics(self, out: dict[str, torch.Tensor], batch: dict[str, Any], stage: str) -> None:
        super()._update_eval_metrics(out, batch, stage)
        if self.rule_names and self.rule_events_key in batch:
            self.metrics[f"{stage}_rule_firing"].update(out["rule_map"], batch[self.rule_events_key])

    def _log_rule_firing(self, stage: str) -> None:
        if not self.rule_names:
            return
        metric = self.metrics[f"{stage}_rule_firing"]
        if metric.update_count:
            result = metric.compute()
            for key, values in result.items():
                self.log(f"{stage}/rule_{key}", values.mean())
                for name, value in zip(self.rule_names, values):
                    self.log(f"{stage}/rule_{key}/{name}", value)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_rule_firing("val")

    def on_test_epoch_end(self) -> None:
        self._log_rule_firing("test")


class ExplanationSystem(EvaluationHooks, pl.LightningModule):
    """Train one variant of Hendricks et al.'s textual explanation model (`zoo.textual.VARIANTS`).

    Before the first step it prepares, unless loaded (`encoder_checkpoint`, `sentence_classifier_checkpoint`): the
    image encoder (a registered classifier trained on the labels for `encoder_epochs`, then frozen) and the sentence
    classifier (trained on the reference sentences for `sentence_classifier_epochs`, then frozen; its probability
    of the true class is the discriminative reward).
    `init_checkpoint` starts from an earlier stage's checkpoint (explanation-label -> explanation,
    description -> explanation-dis), encoder and sentence classifier included.

    Loss: `relevance_weight` x teacher-forced CE on one of each image's reference sentences, plus
    `discriminative_weight` x REINFORCE on sampled sentences. Validation decodes greedily and logs `cider_d`,
    `bleu_4` and `rouge_l` (torchmetrics, F-measure against the best reference), `class_similarity`, `class_rank`
    (lower is better), `attribute_precision` / `attribute_recall` (when the
    datamodule can parse named parts, as parts_world can) and `acc`: the sentence classifier's accuracy on the
    generated sentences (how class-discriminative they are; the checkpoint monitor).
    """

    def __init__(
        self,
        variant: str = "explanation",
        num_classes: int = 6,
        in_chans: int | None = 3,
        image_size: int | None = None,
        data_inputs: dict[str, Any] | None = None,
        vocab_size: int = 25,
        encoder: str = "baseline_tinycnn",
        encoder_checkpoint: str | None = None,
        encoder_epochs: int = 4,
        sentence_classifier_checkpoint: str | None = None,
        sentence_classifier_epochs: int = 4,
        init_checkpoint: str | None = None,
        relevance_weight: float = 1.0,
        discriminative_weight: float = 0.0,
        hidden: int = 256,
        max_len: int = 18,
        train_encoder: bool = False,
        class_features: str = "embedding",
        description_checkpoint: str | None = None,
        aux_lr: float = 2e-3,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        image_key: str = "image",
        target_key: str = "label",
        captions_key: str = "captions",
        start_token: int = 1,
        end_token: int = 2,
    ) -> None:
        super().__init__()
        from torchmetrics.text import BLEUScore, ROUGEScore

        from losses.textual import DiscriminativeLoss, RelevanceLoss
        from zoo.textual.metrics import AttributeMention, CIDErD, ClassRelevance
        from zoo.textual.model import ExplanationModel, SentenceClassifier

        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        image_encoder = create_model_for_data(encoder, num_classes, in_chans, image_size, None, None)
        image_dim = getattr(getattr(image_encoder, "backbone", None), "num_features", None)
        if image_dim is None:
            raise ValueError(f"encoder {encoder!r} has no backbone.num_features; use a backbone classifier such as "
                             f"baseline_tinycnn or baseline_resnet18.")
        class_dim = 64
        if class_features == "description":  # the table holds description-model states: their size
            class_dim = (read_checkpoint(description_checkpoint)["hyper_parameters"].get("hidden", hidden)
                         if description_checkpoint is not None else hidden)
        self.model = ExplanationModel(image_encoder, image_dim, num_classes, vocab_size, variant=variant,
                                      hidden=hidden, max_len=max_len, train_encoder=train_encoder,
                                      class_features=class_features, class_dim=class_dim)
        self.sentence_classifier = SentenceClassifier(vocab_size, num_classes).requires_grad_(False)
        self.register_buffer("encoder_ready", torch.tensor(False))
        self.register_buffer("sentence_classifier_ready", torch.tensor(False))
        if encoder_checkpoint is not None:
            load_module_weights(self.model.image_encoder, encoder_checkpoint, "model.image_encoder.", "image encoder")
            self.encoder_ready.fill_(True)
        if sentence_classifier_checkpoint is not None:
            load_module_weights(self.sentence_classifier, sentence_classifier_checkpoint, "sentence_classifier.",
                                "sentence classifier")
            self.sentence_classifier_ready.fill_(True)
        if init_checkpoint is not None:
            self._load_stage(init_checkpoint)
        self.relevance = RelevanceLoss(relevance_weight)
        self.discriminative = DiscriminativeLoss(discriminative_weight)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            self.metrics[f"{stage}_cider"] = CIDErD(end_token=end_token, start_token=start_token)
            self.metrics[f"{stage}_class"] = ClassRelevance(end_token=end_token, start_token=start_token)
            self.metrics[f"{stage}_attributes"] = AttributeMention()
            self.metrics[f"{stage}_acc"] = AgreementAccuracy()
            self.metrics[f"{stage}_bleu_4"] = BLEUScore(n_gram=4)
            self.metrics[f"{stage}_rouge_l"] = ROUGEScore(rouge_keys="rougeL")  # best reference per sentence

    # -- preparation
    def _load_stage(self, path: str) -> None:
        """An earlier stage's ExplanationSystem checkpoint: every model and sentence-classifier weight must fit."""
        from zoo.weights import CheckpointError

        state = read_checkpoint(path)["state_dict"]
        own = self.state_dict()
        wanted = [k for k in own if k.startswith(("model.", "sentence_classifier.", "encoder_ready",
                                                  "sentence_classifier_ready"))]
        missing = [k for k in wanted if k not in state or state[k].shape != own[k].shape]
        if missing:
            raise CheckpointError(f"{path!r} does not fit variant {self.hparams.variant!r}: missing or mis-shaped "
                                  f"{missing[:8]} (a stage must keep the image/class inputs of the one it starts from).")
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)

    def _fit_encoder(self, epochs: int) -> None:
        encoder, hp = self.model.image_encoder, self.hparams

        def batch_loss(batch: dict[str, Any]) -> torch.Tensor:
            logits = encoder(batch[hp.image_key].to(self.device))["logits"]
            return F.cross_entropy(logits, batch[hp.target_key].to(self.device))

        fit_frozen_module(encoder, self.trainer, batch_loss, epochs, hp.aux_lr)
        encoder.requires_grad_(self.model.train_encoder)
        self.encoder_ready.fill_(True)

    def _fit_sentence_classifier(self, epochs: int) -> None:
        classifier, hp = self.sentence_classifier, self.hparams

        def batch_loss(batch: dict[str, Any]) -> torch.Tensor:
            captions = batch[hp.captions_key].to(self.device)  # (B, R, L)
            words = captions[..., 1:].flatten(0, 1)  # every reference, without <bos>
            labels = batch[hp.target_key].to(self.device).repeat_interleave(captions.shape[1])
            return F.cross_entropy(classifier(words)["logits"], labels)

        fit_frozen_module(classifier, self.trainer, batch_loss, epochs, hp.aux_lr)
        self.sentence_classifier_ready.fill_(True)

    @torch.no_grad()
    def _fill_class_table(self, path: str) -> None:
        """The paper's class feature: per class, the mean over its training sentences of the description model's
        LSTM2 state averaged over each sentence's words (teacher forcing on the sentence, with its image).
        Sums and counts are all-reduced, so every rank holds the table of the whole training set."""
        from zoo.weights import CheckpointError
        from zoo.textual.model import ExplanationModel

        hp = read_checkpoint(path)["hyper_parameters"]
        if hp.get("variant") != "description":
            raise CheckpointError(f"description_checkpoint {path!r} holds variant {hp.get('variant')!r}; the class "
                                  f"table needs a description model (configs/textual/description.yaml).")
        encoder = create_model_for_data(hp["encoder"], hp["num_classes"], hp.get("in_chans"), hp.get("image_size"),
                                        None, None)
        describer = ExplanationModel(encoder, encoder.backbone.num_features, hp["num_classes"], hp["vocab_size"],
                                     variant="description", hidden=hp["hidden"], max_len=hp["max_len"])
        load_module_weights(describer, path, "model.", "description model")
        describer.to(self.device).eval()
        table = self.model.class_table
        sums, counts = torch.zeros_like(table), torch.zeros(len(table), device=table.device)
        for batch in self.trainer.datamodule.train_dataloader():
            images = batch[self.hparams.image_key].to(self.device)
            labels = batch[self.hparams.target_key].to(self.device)
            captions = batch[self.hparams.captions_key].to(self.device)  # (B, R, L)
            references = captions.shape[1]
            feature = describer.features(images, labels).repeat_interleave(references, 0)  # (B*R, F)
            tokens, labels = captions.flatten(0, 1), labels.repeat_interleave(references)  # (B*R, L), (B*R,)
            states = describer.generator.hidden_states(feature, tokens).float()  # (B*R, L-1, H)
            words = (tokens[:, 1:] != 0).float()[..., None]  # (B*R, L-1, 1): the predicted words and <eos>
            sentence = (states * words).sum(1) / words.sum(1).clamp(min=1)  # (B*R, H)
            present = (words.sum((1, 2)) > 0).float()  # (B*R,) an all-padding reference row is no sentence
            sums.index_add_(0, labels, sentence)
            counts += torch.bincount(labels, weights=present, minlength=len(table)).float()
        all_reduce_(sums), all_reduce_(counts)
        if (counts == 0).any():
            raise ValueError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no training sentences: "
                             f"their description feature is undefined.")
        table.copy_(sums / counts[:, None])
        self.model.class_table_ready.fill_(True)

    def on_fit_start(self) -> None:
        if self.model.uses_image and not self.encoder_ready:
            self._fit_encoder(self.hparams.encoder_epochs)
        if not self.sentence_classifier_ready:
            self._fit_sentence_classifier(self.hparams.sentence_classifier_epochs)
        if self.model.uses_class and self.model.class_features == "description" and not self.model.class_table_ready:
            if self.hparams.description_checkpoint is None:
                raise ValueError("class_features='description' needs description_checkpoint (a trained description "
                                 "model, configs/textual/description.yaml) or an init_checkpoint that has the table.")
            self._fill_class_table(self.hparams.description_checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, by name, a checkpoint of another variant, class count, vocabulary or encoder."""
        from zoo.weights import CheckpointError

        saved = checkpoint.get("hyper_parameters") or {}
        for key in ("variant", "num_classes", "vocab_size", "encoder", "class_features"):
            if key in saved and saved[key] != self.hparams[key]:
                raise CheckpointError(f"The checkpoint holds an explanation model with {key}={saved[key]!r}; this run "
                                      f"builds {key}={self.hparams[key]!r}.")

    def train(self, mode: bool = True) -> "ExplanationSystem":
        super().train(mode)
        self.sentence_classifier.eval()
        if not self.model.train_encoder:
            self.model.image_encoder.eval()
        return self

    # -- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, labels = batch_field(batch, self.hparams.image_key), batch_field(batch, self.hparams.target_key)
        captions = batch_field(batch, self.hparams.captions_key)  # (B, R, L)
        if captions.max() >= self.hparams.vocab_size:
            raise ValueError(f"captions hold token id {int(captions.max())} >= vocab_size {self.hparams.vocab_size}.")
        pick = torch.randint(captions.shape[1], (len(captions),), device=captions.device)
        tokens = captions[torch.arange(len(captions), device=captions.device), pick]  # one reference per image
        terms = self.relevance(self.model(images, labels, tokens), {"tokens": tokens})
        if self.hparams.discriminative_weight > 0:
            sampled, log_probs = self.model.explain(images, labels, mode="sample")
            reward = self.sentence_classifier.true_class_probability(sampled, labels)
            terms |= self.discriminative({"reward": reward, "sample_log_probs": log_probs}, batch)
            self.log("train/reward", reward.mean(), on_step=True, on_epoch=True, batch_size=len(labels))
        loss = torch.stack(list(terms.values())).sum()
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=len(labels))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        images, labels = batch_field(batch, self.hparams.image_key), batch_field(batch, self.hparams.target_key)
        captions = batch_field(batch, self.hparams.captions_key)
        generated, _ = self.model.explain(images, labels, mode="greedy")
        self.metrics[f"{stage}_cider"].update(generated, captions)
        self.metrics[f"{stage}_class"].update(generated, captions, labels)
        self.metrics[f"{stage}_acc"].update(self.sentence_classifier(generated)["logits"], labels)
        self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"], on_epoch=True, prog_bar=True)
        hp = self.hparams
        texts = as_text(generated, hp.end_token, hp.start_token)
        references = as_text(captions, hp.end_token, hp.start_token)
        self.metrics[f"{stage}_bleu_4"].update(texts, references)
        self.metrics[f"{stage}_rouge_l"].update(texts, references)
        mentioned = getattr(self.trainer.datamodule, "mentioned", None) if self._trainer is not None else None
        if mentioned is not None and "part_types" in batch and "distractor_types" in batch:
            self.metrics[f"{stage}_attributes"].update(mentioned(generated), batch["part_types"],
                                                       batch["distractor_types"])

    def _log_epoch_metrics(self, stage: str) -> None:
        cider, relevance, attributes, bleu, rouge = (self.metrics[f"{stage}_{k}"] for k in (
            "cider", "class", "attributes", "bleu_4", "rouge_l"))
        if cider.update_count:
            self.log(f"{stage}/cider_d", cider.compute())
            self.log_dict({f"{stage}/{k}": v for k, v in relevance.compute().items()})
            self.log(f"{stage}/bleu_4", bleu.compute())
            self.log(f"{stage}/rouge_l", rouge.compute()["rougeL_fmeasure"])
        if attributes.update_count:
            self.log_dict({f"{stage}/{k}": v for k, v in attributes.compute().items()})
        for metric in (cider, relevance, attributes, bleu, rouge):
            metric.reset()

    def configure_optimizers(self) -> Any:
        return ClassificationSystem.configure_optimizers(self)  # trainable weights only; scheduler per epoch


class DetectionSystem(EvaluationHooks, pl.LightningModule):
    """Train a torchvision-style detector from the registry (AOG-parsed R-CNN or its opaque baselines).

    The loss is torchvision's dict (RPN objectness and boxes, RoI classification and boxes), summed and logged per
    term. Validation/test log mAP@0.5 (`map_50`, the checkpoint monitor) and mAP@[.5:.95] (`map`) from torchmetrics'
    MeanAveragePrecision; where the data has part boxes, the parse-part IoU of the detector's parse-tree leaves
    (`parse_*`, AOG only) next to the same score for a fixed uniform grid of cells (`grid_*`) and for the whole box
    (`box_*`), measured on the same detections.

    Args:
        model_name: registry name, e.g. "aog_rcnn_tinycnn"; num_classes: object classes (background added by the
            model), linked from the datamodule; in_chans, image_size: linked from the datamodule.
        unfold_epoch: the folding -> unfolding schedule: OR-nodes take the mean of their children before this epoch
            and the max from it on (None keeps the model's `or_mode`). Logged as `schedule/or_max`.
        nonfinite_loss: "raise" (FloatingPointError naming step, batch and terms) or "skip" the batch.
    """

    def __init__(self, model_name: str = "aog_rcnn_tinycnn", num_classes: int = 4, in_chans: int | None = 3,
                 image_size: int | None = 128, data_inputs: dict[str, Any] | None = None,
                 model_kwargs: dict[str, Any] | None = None, optimizer: OptimizerCallable = torch.optim.Adam,
                 scheduler: LRSchedulerCallable | None = None, unfold_epoch: int | None = None,
                 nonfinite_loss: str = "raise") -> None:
        super().__init__()
        from torchmetrics.detection import MeanAveragePrecision

        from zoo.aog_rcnn.metrics import ParsePartIoU

        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = create_model_for_data(model_name, num_classes, in_chans, image_size, None, model_kwargs)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip'; got {nonfinite_loss!r}.")
        from zoo.aog_rcnn.model import AOGParsing, GridGrammar

        parser = getattr(self.model, "parser", None)
        self.partitions = ("parse", "grid", "box") if parser is not None else ("grid", "box")
        # leaf boxes of every partition come from the detector's grammar (baselines: the same 3x3 grid's)
        self.leaf_parser = parser if parser is not None else AOGParsing(GridGrammar(*self.model.grammar_size()))
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            self.metrics[f"{stage}_map"] = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
            for partition in self.partitions:
                self.metrics[f"{stage}_{partition}_parts"] = ParsePartIoU()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def on_train_epoch_start(self) -> None:
        if self.hparams.unfold_epoch is not None:
            unfolding = self.current_epoch >= self.hparams.unfold_epoch
            self.model.set_or_mode("max" if unfolding else "mean")
            self.log("schedule/or_max", float(unfolding), on_step=False, on_epoch=True)

    @staticmethod
    def _unpack(batch: Any) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        if not isinstance(batch, dict) or "images" not in batch or "targets" not in batch:
            raise TypeError("Detection batches are {'images': [...], 'targets': [...]} (datamodules built on "
                            f"DetectionDataModule); got {type(batch).__name__} "
                            f"{sorted(batch) if isinstance(batch, dict) else ''}.")
        return batch["images"], batch["targets"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        images, targets = self._unpack(batch)
        bad = [i for i, im in enumerate(images) if im.device.type == "cpu" and not torch.isfinite(im).all()]
        if bad:
            raise ValueError(f"Images at batch positions {bad[:8]} hold NaN or inf values; fix or filter them.")
        terms = self.model(images, [{k: v for k, v in t.items() if k in ("boxes", "labels")} for t in targets])
        loss = torch.stack(list(terms.values())).sum()
        if not torch.isfinite(loss):
            message = (f"Non-finite training loss at global step {self.global_step}, epoch {self.current_epoch}, "
                       f"batch {batch_idx}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            if self.hparams.nonfinite_loss == "raise":
                raise FloatingPointError(message + ". The last checkpoint is the last good state.")
            rank_zero_warn(message + "; batch skipped (nonfinite_loss='skip').")
            return None
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        images, targets = self._unpack(batch)
        detections = self.model(images)
        self.metrics[f"{stage}_map"].update(
            [{k: d[k] for k in ("boxes", "scores", "labels")} for d in detections],
            [{"boxes": t["boxes"], "labels": t["labels"], **({"iscrowd": t["difficult"].long()}
                                                             if "difficult" in t else {})} for t in targets])
        if all("part_boxes" in t for t in targets):
            for partition in self.partitions:
                preds = [self._with_leaves(d, partition) for d in detections]
                self.metrics[f"{stage}_{partition}_parts"].update(preds, targets)

    def _with_leaves(self, detection: dict[str, torch.Tensor], partition: str) -> dict[str, torch.Tensor]:
        """A detection with the leaf boxes of one partition: its parse tree, the uniform cells, or the box."""
        parser = self.leaf_parser
        boxes = detection["boxes"]
        if partition == "parse":
            mask = detection["parse_leaves"]
        else:
            fixed = parser.uniform_leaves() if partition == "grid" else parser.whole_box_leaves()
            mask = fixed[None].expand(len(boxes), -1)
        return {**detection, "leaf_boxes": parser.leaf_boxes(boxes), "leaf_mask": mask}

    def _log_epoch_metrics(self, stage: str) -> None:
        average_precision = self.metrics[f"{stage}_map"]
        if average_precision.update_count == 0:
            return
        results = average_precision.compute()
        self.log(f"{stage}/map_50", results["map_50"].float(), sync_dist=False, prog_bar=True)
        self.log(f"{stage}/map", results["map"].float(), sync_dist=False)
        average_precision.reset()
        for partition in self.partitions:
            metric = self.metrics[f"{stage}_{partition}_parts"]
            if metric.update_count:
                for name, value in metric.compute().items():
                    self.log(f"{stage}/{partition}_{name}", value, sync_dist=False)
                metric.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        images, _ = self._unpack(batch)
        return self.model(images)

    def configure_optimizers(self) -> Any:
        return ClassificationSystem.configure_optimizers(self)

"""The L2X family's System: an amortised feature selector (L2X, INVASE) trained to explain a frozen black box."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable

from zoo.checks import batch_field
from zoo.engine import Auxiliary, ZooSystem, load_auxiliary_checkpoints
from zoo.explain.captum import FEATURE_METHODS, perturbation_samples
from zoo.l2x.metrics import AgreementAccuracy, MedianRank, SelectionRecovery
from zoo.registry import create_model_for_data


class L2XSystem(ZooSystem):
    """Train an amortised feature selector (L2X, INVASE) to explain a frozen black box.

    Two auxiliaries (`zoo.engine.Auxiliary`) are ready before the selector's first step: the black box (loaded
    from `black_box_checkpoint`: a state dict, safetensors file or Lightning checkpoint of a classifier or L2X
    System; or trained on the labels for `black_box_epochs`), and an EVAL-X evaluator of the same architecture
    (Jethani et al. 2021), trained on inputs whose features are kept at random with probability 0.5, which scores
    explanations without having co-adapted with the selector. Both live in the checkpoint, so a resumed run does
    not retrain them. The selector's loss sees the black box's probabilities as `teacher_probs`.

    Logged in validation/test: `acc` = accuracy against the labels of the approximator's (INVASE: the critic's)
    prediction from the selected features alone (what `acc` means for every System, the opaque twin's included);
    `posthoc_acc` = post-hoc accuracy (the black box on the selected input agrees with the black box on the full
    input: the L2X configs keep their best checkpoint by it, see configs/l2x/), `evalx_acc`,
    `approximator_fidelity` (the selector's own approximator agrees with the black box), `black_box_acc`,
    `num_selected` (mean hard selection size; INVASE's varies), and where the batch has ground truth
    (`relevant_key`): `median_rank` (features ranked by their continuous scores), `median_rank_selection` (ranked by
    the hard selection, random order inside the selected and inside the rest: the authors' protocol,
    `zoo.l2x.metrics`), `tpr`, `fdr`. Predict returns the approximator's class probabilities (the
    selected features alone), the black box's class, and each sample's feature `scores` and `selection` (see
    `predict_step`).

    Twin (`train.py compare --config configs/l2x/<x>.yaml`): the black box itself, trained as a classifier with
    the same data, seed and budget; the comparison's explanation table scores the selector against Captum's
    post-hoc explainers of the selector's own black box (`explanation_report`, `zoo.l2x.scores`).

    Args:
        model_name: a registered selector (`l2x_vector`, `l2x_patches`, `l2x_tokens`, `invase_*`).
        black_box: registered classifier to explain; built with the same data inputs (the evaluator too).
        black_box_kwargs: extra keyword arguments for the black box (and evaluator).
        black_box_checkpoint / evaluator_checkpoint: load from this file instead of training.
        black_box_epochs / evaluator_epochs: training epochs, >= 0 (evaluator 0: no EVAL-X evaluator, no evalx_acc;
            black box 0 only with black_box_checkpoint, or where a checkpoint restores the System).
        aux_lr: Adam learning rate for the black box and the evaluator.
        loss: default `L2XLoss` for L2X, `INVASELoss` for INVASE.
        relevant_key: batch field with the true features (B, d), where the data knows them.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "black_box": ["--model=zoo.baselines.system.ClassifierSystem", "--model.init_args.model_name={black_box}",
                      "--model.init_args.loss=null",  # the classifier's cross-entropy, not the selector's loss
                      "--model.init_args.model_kwargs=null",  # then set, not merged into the selector's kwargs
                      "--model.init_args.model_kwargs={black_box_kwargs}", "--model.init_args.input_key={input_key}",
                      # the config's selection pictures have nothing to draw for a classifier; compare applies this
                      # before the spec's and command line's options, so the callbacks they give reach the twin
                      "--trainer.callbacks=null",
                      "--checkpoint.monitor=val/acc", "--checkpoint.mode=max"],  # not the selector's posthoc_acc
    }

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
        scheduler: LRSchedulerCallable | None = None,
        input_key: str = "features",
        target_key: str = "label",
        relevant_key: str = "relevant",
        nonfinite_loss: str = "raise",
        compile: bool | str = False,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__(model_name=model_name, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                         data_inputs=data_inputs, model_kwargs=model_kwargs, loss=loss, optimizer=optimizer,
                         scheduler=scheduler, input_key=input_key, target_key=target_key,
                         nonfinite_loss=nonfinite_loss, compile=compile, class_names=class_names)
        self.relevant_key = relevant_key
        self.check_loss_fits_selector()  # before the helpers are built, let alone trained
        self.check_helper_settings(black_box_epochs, black_box_checkpoint, evaluator_epochs)
        self.black_box = create_model_for_data(black_box, num_classes, in_chans, image_size, data_inputs,
                                               black_box_kwargs)
        self.evaluator = create_model_for_data(black_box, num_classes, in_chans, image_size, data_inputs,
                                               black_box_kwargs)
        for frozen in (self.black_box, self.evaluator):  # never in the selector's optimiser (nor wrapped by DDP)
            frozen.requires_grad_(False)
        self.register_buffer("black_box_ready", torch.tensor(False))
        self.register_buffer("evaluator_ready", torch.tensor(False))
        for name in ("acc", "posthoc_acc", "evalx_acc", "approximator_fidelity", "black_box_acc"):
            self.add_metric(name, AgreementAccuracy())
        self.add_metric("median_rank", MedianRank())  # by the continuous scores
        self.add_metric("median_rank_selection", MedianRank(rank_by="selection"))  # the authors': by the selection
        self.add_metric("recovery", SelectionRecovery(), log_prefix="")
        load_auxiliary_checkpoints(self)

    # ------------------------------------------------------------------------------------------- family hooks
    def build_model(self) -> nn.Module:
        model = super().build_model()
        if not hasattr(model, "mask_input"):
            raise ValueError(f"{self.hparams.model_name!r} is not a feature selector (no mask_input); use an l2x_* "
                             f"or invase_* model, or ClassifierSystem for classifiers.")
        return model

    def check_loss_fits_selector(self) -> None:
        """Refuse the family's loss of the other selector: INVASELoss on L2X reads `baseline_logits`, which L2X has
        not (a KeyError at the first step, after the black box and the evaluator trained); L2XLoss on INVASE trains
        the critic alone, and the actor, whose Bernoulli draw passes no gradient, never learns (a run to the end
        with its gradients all zero). Another loss class is the user's to vouch for."""
        from losses.l2x import INVASELoss, L2XLoss
        from zoo.l2x.model import INVASE, L2X

        name, loss = self.hparams.model_name, type(self.loss).__name__
        mismatches = (  # (loss class, selector class, the selector's family, why, its own loss, the other's model)
            (INVASELoss, L2X, "an L2X selector", "INVASELoss trains INVASE's actor, critic and baseline and reads the "
             "output 'baseline_logits', which L2X does not give", "L2XLoss", "an invase_* model (e.g. invase_vector) "
             "with INVASELoss"),
            (L2XLoss, INVASE, "an INVASE selector", "L2XLoss trains only the critic on the selected input, and "
             "INVASE's actor, whose Bernoulli selection passes no gradient, would never learn (its gradients all "
             "zero)", "INVASELoss", "an l2x_* model (e.g. l2x_vector) with L2XLoss"),
        )
        for loss_class, selector, family, why, own, other in mismatches:
            if isinstance(self.loss, loss_class) and isinstance(self.model, selector):
                raise ValueError(f"loss {loss} does not fit model_name={name!r} ({family}): {why}. Use "
                                 f"losses.l2x.{own} with {name} (or give no loss: {own} is its default), or {other}.")

    @staticmethod
    def check_helper_settings(black_box_epochs: int, black_box_checkpoint: str | None, evaluator_epochs: int
                              ) -> None:
        """Refuse, when the System is built, helper settings that no run can use: a negative number of epochs
        (trained as 0, silently), and a black box that would be neither trained nor loaded (`black_box_epochs` 0
        without `black_box_checkpoint`), which `require_black_box` refused only at the fit's start, after the EVAL-X
        evaluator had trained (minutes on text), with a traceback. Allowed where a checkpoint's weights replace the
        System's (`zoo.weights.weights_will_be_replaced`: `--ckpt_path`, a resumed fit, `load_from_checkpoint`):
        its black box comes from there."""
        from zoo.weights import weights_will_be_replaced

        for name, epochs, zero in (("black_box_epochs", black_box_epochs, "with black_box_checkpoint: load it"),
                                   ("evaluator_epochs", evaluator_epochs, "no EVAL-X evaluator, no evalx_acc")):
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
                raise ValueError(f"{name} (epochs of training before the selector's) must be a whole number >= 0 "
                                 f"(0: {zero}); got {epochs!r}.")
        if black_box_epochs == 0 and black_box_checkpoint is None and not weights_will_be_replaced():
            raise ValueError("black_box_epochs=0 and no black_box_checkpoint: the black box the selector explains "
                             "would be neither trained nor loaded. Set black_box_epochs to a number of epochs > 0 "
                             "(the configs in configs/l2x/ use 2 to 60), or give black_box_checkpoint (a classifier's "
                             "weights, or an L2X run's checkpoint), or restore an L2X checkpoint (--ckpt_path).")

    def default_loss(self) -> nn.Module:
        from losses.l2x import INVASELoss, L2XLoss
        from zoo.l2x.model import L2X

        return L2XLoss() if isinstance(self.model, L2X) else INVASELoss()

    def auxiliaries(self) -> list[Auxiliary]:
        from losses.l2x import LabelCrossEntropy, RandomMaskCrossEntropy

        hp = self.hparams
        evaluator_loss = RandomMaskCrossEntropy(self.input_key, self.target_key, self.model.mask_input,
                                                self.model.num_features)
        return [Auxiliary("black_box", LabelCrossEntropy(self.input_key, self.target_key), hp.black_box_epochs,
                          hp.aux_lr, hp.black_box_checkpoint),
                Auxiliary("evaluator", evaluator_loss, hp.evaluator_epochs, hp.aux_lr, hp.evaluator_checkpoint)]

    def forward_batch(self, batch: Any, stage: str) -> dict[str, Any]:
        """The selector's output plus `teacher_logits` (B, C): the frozen black box on the full input."""
        x = batch_field(batch, self.input_key)
        with torch.no_grad():
            teacher_logits = self.black_box(x)["logits"].float()
        return {**self.model(x), "teacher_logits": teacher_logits}

    def compute_loss(self, out: dict[str, Any], batch: Any, stage: str) -> dict[str, torch.Tensor]:
        return super().compute_loss(out, {**batch, "teacher_probs": out["teacher_logits"].softmax(-1)}, stage)

    def update_metrics(self, out: dict[str, Any], batch: Any, stage: str) -> None:
        if stage == "train":
            return
        x, y, teacher = batch[self.input_key], batch[self.target_key], out["teacher_logits"]
        masked = self.model.mask_input(x, out["selection"])  # eval mode: hard selection (exact top-k for L2X)
        self.log_metric(stage, "acc", out["logits"], y, prog_bar=True)
        self.log_metric(stage, "posthoc_acc", self.black_box(masked)["logits"], teacher, prog_bar=True)
        self.log_metric(stage, "approximator_fidelity", out["logits"], teacher)
        self.log_metric(stage, "black_box_acc", teacher, y)
        if self.evaluator_ready:
            self.log_metric(stage, "evalx_acc", self.evaluator(masked)["logits"], y)
        relevant = batch.get(self.relevant_key)  # (B, d) true features, where the data knows them
        self.log_metric(stage, "recovery", out["selection"], relevant)  # num_selected always; tpr, fdr with truth
        if relevant is not None:  # both rank the features a selection may keep (text: the words, padding after)
            selectable = self.model.selectable(x)  # (B, d) bool, or None: every feature
            self.log_metric(stage, "median_rank", out["scores"], relevant, None, selectable)
            self.log_metric(stage, "median_rank_selection", out["scores"], relevant, out["selection"], selectable)

    def explanation_report(self, datamodule: Any, settings: dict[str, Any]
                           ) -> tuple[list[dict], dict[str, torch.Tensor], torch.Tensor | None]:
        """The selector, every Captum feature method (`settings["methods"]`, default all of FEATURE_METHODS;
        on token ids they attribute each position's presence, `zoo.explain.captum.attribute_features`) and last the
        `random` floor (k features drawn uniformly: the reference row every model gets, listed or not, as the image
        families' `random` row) explaining this System's black box on `num_images` validation samples (drawn once,
        class-stratified: the compare stage's `zoo.explain.scores.explained_batch`), scored alike (`zoo.l2x.scores`).
        Maps (kept pixels of each method's selection) and images for image inputs; none for vectors and tokens. The
        maps explain the black box's predicted class (`explained_classes`)."""
        from zoo.explain.scores import explained_batch, model_input
        from zoo.l2x.scores import RANDOM, compare_explainers

        _, batch = explained_batch(self, datamodule, int(settings.get("num_images", 32)))
        x = model_input(self, batch[self.input_key])  # in the model's dtype: float64 / bf16 under *-true precision
        relevant = batch.get(self.relevant_key)
        methods = [m for m in settings.get("methods", FEATURE_METHODS)  # "lime:5000" kept: a sample count
                   if perturbation_samples(m)[0] in FEATURE_METHODS]  # the image families' methods skipped
        methods = [*dict.fromkeys(methods), RANDOM]  # the floor: always, last, listed or not
        selector = type(self.model).__name__.lower()  # "l2x" or "invase"
        was_training = self.training
        self.eval()
        k = getattr(self.model, "k", None)  # INVASE: post-hoc methods keep the true set size, as in the race
        if k is None and relevant is not None:
            k = int(relevant.sum(-1).max())
        elif k is None:  # no ground truth: as many features as INVASE keeps on average
            with torch.no_grad():
                k = max(1, round(self.model(x)["selection"].sum(-1).float().mean().item()))
        explained = compare_explainers(
            {selector: self.model}, self.black_box, self.evaluator if self.evaluator_ready else None, x,
            batch[self.target_key].to(self.device), None if relevant is None else relevant.to(self.device), k,
            [selector, *methods], settings.get("num_perturbed"))
        self.train(was_training)
        if x.ndim != 4:
            return explained.rows, {}, None
        ones = torch.ones_like(x[:, :1])  # (N, 1, H, W)
        maps = {method: self.model.mask_input(ones, selection)[:, 0] for method, selection in
                explained.selections.items() if method != RANDOM}  # (N, H, W) kept pixels; the floor not drawn
        return explained.rows, maps, x

    def explained_classes(self, images: torch.Tensor) -> tuple[str, list[int]]:
        """What the maps of `explanation_report` explain for its `images` (N, ...): the black box's predicted class
        (N,), as `compare_explainers` explains it (not the label, nor the approximator's class), for the compare
        figure (`zoo.explain.scores.explained_run`), which titled them "maps explain the true class"."""
        from zoo.explain.scores import model_input
        from zoo.layers import eval_mode

        with eval_mode(self.black_box), torch.no_grad():
            logits = self.black_box(model_input(self, images))["logits"]  # (N, C)
        return "black box pred", logits.argmax(-1).tolist()

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """What `zoo.cli.predict.PredictionWriter` writes, plus each sample's feature `scores` and `selection`.

        `probs` / `pred` are the selector's approximator's (INVASE: the critic's): the class the selected features
        alone give, which approximates the black box. The black box's own class on the full input and the selected
        features are extra CSV `columns` (`black_box_pred` and its name; `selected`: feature indices, patch indices
        for images, token positions for text; for text also `selected_words`, the selected words in text order,
        through the datamodule's public `decode(tokens)`). `explanation` is the selection at the input's
        resolution: kept pixels (B, H, W) for images, (B, d) otherwise."""
        x = batch_field(batch, self.input_key)
        out = self.model(x)
        probs = out["logits"].float().softmax(-1)
        black_box_pred = self.black_box(x)["logits"].argmax(-1).tolist()
        selection = out["selection"]
        explanation = out["pixel_selection"][:, 0] if "pixel_selection" in out else selection
        selected = [" ".join(map(str, row.nonzero().flatten().tolist())) for row in selection.detach().cpu()]
        columns = {"black_box_pred": black_box_pred, "black_box_pred_name": [self.class_names[c] for c in
                                                                             black_box_pred], "selected": selected}
        decode = getattr(self.trainer.datamodule, "decode", None) if self._trainer is not None else None
        if decode is not None and not x.is_floating_point():  # token ids: the words, padding dropped by decode
            kept = self.model.mask_input(x, selection).cpu()  # (B, L) unselected positions are padding
            columns["selected_words"] = [decode(row) for row in kept]
        return {"probs": probs, "pred": probs.argmax(-1), "scores": out["scores"], "selection": selection,
                "explanation": explanation, "columns": columns,
                **({"index": batch["index"]} if "index" in batch else {})}

    # ------------------------------------------------------------------------------------------- readiness
    def on_train_start(self) -> None:
        self.require_black_box()
        super().on_train_start()

    def on_validation_start(self) -> None:
        self.require_black_box()

    on_test_start = on_predict_start = on_validation_start

    def require_black_box(self) -> None:
        if not self.black_box_ready:
            raise RuntimeError("The black box is neither trained nor loaded: run fit with black_box_epochs > 0, pass "
                               "black_box_checkpoint, or load an L2XSystem checkpoint.")

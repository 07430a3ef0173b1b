"""CBM's pictures and reports: predicted vs true concepts over a fixed batch (with each concept's F1 and AUROC), and
the test-time intervention curve."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.seed import isolate_rng

from zoo.cbm.intervene import (VALUES, check_order, concept_groups, encode_data, intervention_curve,
                                write_intervention_report)
from zoo.engine.callbacks import (FixedBatchCallback, logged_step, precision_context, precision_input,
                                  run_folder, whole_split_loader)
from zoo.figures import class_name, log_figure, log_text, new_figure
from zoo.layers import eval_mode


def concept_names(trainer: pl.Trainer, num_concepts: int) -> list[str]:
    """The datamodule's public `concept_names` or `attribute_names` when they fit, else "concept i"."""
    for attribute in ("concept_names", "attribute_names"):
        names = getattr(trainer.datamodule, attribute, None)
        if names is not None and len(names) == num_concepts:
            return list(names)
    return [f"concept {i}" for i in range(num_concepts)]


class ConceptsCallback(FixedBatchCallback):
    """After each validation epoch: the fixed validation batch (one image of each class first) with, under each
    image, the true and predicted class and its concepts: right ones, wrong ones (predicted present but absent,
    or missed), each with its predicted probability, then the F1 and AUROC of every concept over the epoch's
    validation data (`CBMSystem.concept_table`). TensorBoard figure ``concepts/predicted`` and text
    ``concepts/table``; in the run folder ``concepts/epoch<e>.png`` and ``.md``.

    Args:
        num_images: images in the fixed batch.
        max_listed: concepts listed per image (the true ones and the wrongly predicted ones, most confident first).
    """

    def __init__(self, num_images: int = 8, max_listed: int = 6) -> None:
        super().__init__()
        self.num_items, self.max_listed = num_images, max_listed

    def describe(self, probs: torch.Tensor, truth: torch.Tensor, names: list[str]) -> list[str]:
        """One line per listed concept of one image: "+ red ring 0.93" (right), "! blue cross 0.71 (absent)",
        "? green circle 0.12 (missed)"."""
        predicted = probs > 0.5
        relevant = (predicted | truth).nonzero().flatten()
        relevant = relevant[probs[relevant].sub(0.5).abs().argsort(descending=True)][: self.max_listed]
        lines = []
        for i, p, t in zip(relevant.tolist(), probs[relevant].tolist(), truth[relevant].tolist()):
            lines.append(f"+ {names[i]} {p:.2f}" if (p > 0.5) == t else
                         f"! {names[i]} {p:.2f} (absent)" if p > 0.5 else f"? {names[i]} {p:.2f} (missed)")
        return lines

    def collective(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """Each concept's validation F1 and AUROC (gathered over the ranks, so every rank calls it)."""
        return pl_module.concept_table("val") if hasattr(pl_module, "concept_table") else {}

    @staticmethod
    def concept_rows(table: dict[str, torch.Tensor], names: list[str]) -> list[str]:
        """The markdown table of each concept's F1 and AUROC ("-" where undefined: a concept never present and never
        predicted has no F1, one with a single truth value over the data no AUROC)."""
        if not table:
            return []
        columns = [column for column in ("f1", "auroc") if column in table]
        rows = ["", "| concept | " + " | ".join(c.upper() for c in columns) + " |",
                "| --- |" + " --- |" * len(columns)]
        values = {column: table[column].tolist() for column in columns}
        for i, name in enumerate(names):
            cells = ["-" if value[i] != value[i] else f"{value[i]:.3f}" for value in values.values()]  # NaN: "-"
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
        return rows

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: Any) -> None:
        batch = self.fixed_batch(trainer)
        images = batch[pl_module.input_key].to(pl_module.device)
        out = pl_module.model(images)
        probs = out["concept_probs"].float().cpu()  # (N, K)
        truth = batch[pl_module.concept_key].bool().cpu()
        predicted_class = out["logits"].argmax(-1).tolist()
        labels = batch[pl_module.target_key].tolist()
        names = concept_names(trainer, probs.shape[1])
        shown, datamodule = self.displayable(trainer, images), trainer.datamodule
        figure, axes = new_figure(1, len(images), panel_inches=2.0)
        rows = ["| image | true class | predicted class | concepts (+ right, ! predicted but absent, ? missed) |",
                "| --- | --- | --- | --- |"]
        for column, (image, p, t) in enumerate(zip(shown, probs, truth)):
            lines = self.describe(p, t, names)
            true_name, predicted_name = class_name(datamodule, labels[column]), class_name(datamodule,
                                                                                         predicted_class[column])
            ax = axes[0, column]
            ax.imshow(image.permute(1, 2, 0).numpy().squeeze())
            ax.set_title(f"true: {true_name}\npred: {predicted_name}", fontsize=8)
            ax.set_xlabel("\n".join(lines), fontsize=7, loc="left")
            rows.append(f"| {column} | {true_name} | {predicted_name} | {'<br>'.join(lines)} |")
        rows += self.concept_rows(shared or {}, names)
        markdown = "\n".join(rows) + "\n"
        self.publish(trainer, "concepts", figure, markdown, "predicted")


class InterventionCallback(pl.Callback):
    """The test-time intervention curve (`zoo.cbm.intervene`): at the end of fit on the validation split, and at
    the end of a test run on the test split, over the whole split whatever the number of processes (k = 0 is the
    task accuracy). Writes ``intervention/<split>.md`` and ``.png`` in the run folder and the same to TensorBoard
    (figure ``intervention/<split>``, text), on rank zero, in eval mode, RNG isolated;
    without a run folder (no logger, `fast_dev_run`) the curve is only kept in `curves`. The standard twin
    (`bottleneck=False`) is skipped: f does not read the concepts, so correcting them changes nothing. With
    `by_groups`, one step corrects a whole group of concepts (Koh et al.'s CUB curve: 28 groups of the 112 attributes)
    and k counts groups; the table names the group corrected k-th.

    Args:
        values: "percentile" (5th / 95th percentile logits: Koh et al.'s for an f reading logits, carried through
            the zoo's sigmoid; `zoo.cbm.intervene`) or "hard" (0 / 1); None: "hard" for concept
            embedding models (CEM's interventions) and for mode "independent" (f was trained on the true 0/1
            concepts, as Koh et al.'s tti.py corrects such models), "percentile" otherwise.
        seed: the random order(s) of the corrected concepts.
        num_points: at most this many values of k, evenly spaced from 0 to K (both included).
        order: "random" (one seeded order for every image) or "uncertainty" (each image's concepts whose predicted
            probability is closest to 0.5 first).
        trials: with order "random", the curve is the mean over this many random orders (Koh et al.: 5).
        by_groups: correct concepts by groups (`zoo.cbm.intervene.concept_groups`: the datamodule's concept names
            grouped by their part before "::", e.g. CUB's "has_bill_shape::dagger" in "has_bill_shape"; a name
            without "::", or no names, its own group): the random order permutes groups, "uncertainty" ranks a group
            by its concepts' mean |logit|, and k runs over 0 .. G (at most `num_points` values).
    """

    report_only = True  # tabulates only (eval mode, RNG isolated): `ablate` leaves it out of a point's settings hash

    def __init__(self, values: str | None = None, seed: int = 0, num_points: int = 40, order: str = "random",
                 trials: int = 1, by_groups: bool = False) -> None:
        if values is not None and values not in VALUES:
            raise ValueError(f"values must be one of {VALUES} or None; got {values!r}.")
        check_order(order, trials)
        self.values, self.seed, self.num_points, self.order, self.trials = values, seed, num_points, order, trials
        self.by_groups = by_groups
        self._warned = False  # the by_groups warning, once per run
        self.curves: dict[str, dict[str, Any]] = {}

    @staticmethod
    def default_values(pl_module: pl.LightningModule) -> str:
        """"hard" for a concept embedding model or an independent CBM, "percentile" otherwise (see the class)."""
        hard = getattr(pl_module.model, "embedding_size", 0) or getattr(pl_module, "mode", None) == "independent"
        return "hard" if hard else "percentile"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module, "test")

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        if not trainer.is_global_zero or trainer.datamodule is None or trainer.sanity_checking:
            return
        model = pl_module.model
        if not getattr(model, "bottleneck", True):  # the standard twin: f reads the features, not the concepts
            return
        values = self.values or self.default_values(pl_module)
        # the whole split (under DDP the datamodule's loader holds rank zero's shard only: the curve depended on the
        # process count); the other ranks wait at their next collective meanwhile
        loader = whole_split_loader(trainer.datamodule.val_dataloader() if split == "val"
                                    else trainer.datamodule.test_dataloader())
        if trainer.limit_val_batches == 0 or trainer.fast_dev_run:
            loader = [next(iter(loader))]  # a smoke run: one batch
        with eval_mode(model), isolate_rng(), torch.no_grad():  # every module's mode kept (a frozen f stays eval)
            with precision_context(trainer):  # the model as the run computes it (bf16-true, 64-true weights)
                encoded, concepts, labels = encode_data(model, (precision_input(trainer, b) for b in loader),
                                                        pl_module.concept_key, pl_module.input_key,
                                                        pl_module.target_key, pl_module.device)
            names = concept_names(trainer, concepts.shape[1])
            groups, names = concept_groups(names) if self.by_groups else (None, names)  # names: what k counts
            if self.by_groups and groups is not None and len(names) == len(groups) and not self._warned:
                self._warned = True
                rank_zero_warn("by_groups=True, but no concept name has a '<group>::<value>' prefix, so each "
                               "concept is its own group and k counts concepts (CUB: attributes.txt, next to "
                               "image_attribute_labels.txt, names the groups).")
            steps = len(names)  # K concepts, or G groups
            ks = torch.linspace(0, steps, min(self.num_points, steps + 1)).round().long().unique()
            curve = intervention_curve(model, encoded, concepts, labels, ks.tolist(), self.seed, values,
                                       order=self.order, trials=self.trials, groups=groups)
        self.curves[split] = curve
        folder = run_folder(trainer, "intervention")
        if folder is None:  # no run folder (fast_dev_run): the curve is kept in `curves` only
            return
        markdown, figure = write_intervention_report(curve, folder, split, names)
        log_figure(trainer.loggers, f"intervention/{split}", figure, logged_step(trainer, at_fit_end=split == "val"))
        log_text(trainer.loggers, f"intervention/{split}", markdown, logged_step(trainer, at_fit_end=split == "val"))

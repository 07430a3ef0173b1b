"""The five textual-explanation variants of Hendricks et al. (2016) on the parts world, trained and scored in one
run: definition, description, explanation-label, then explanation-dis (from description) and explanation (from
explanation-label) with the discriminative loss; plus an equal-budget control: explanation-label continued from
its own checkpoint for the same epochs as the explanation stage with the discriminative weight at 0.

    python -m benchmarks.textual_variants [--name textual_variants] [--seeds 0 1 2] [--device cpu|cuda]
        [fit overrides, e.g. --trainer.max_epochs=2]

The description run trains the image encoder and the sentence classifier; every other run of the same seed loads
those two from its checkpoint, so all variants share the image features and the reward. Each variant is
`configs/textual/<variant>.yaml`, chained by checkpoint paths. The control isolates the discriminative loss: the
explanation model gets 4 epochs more than explanation-label, and validation CIDEr-D moves from epoch to epoch, so
"explanation vs explanation-label" mixes the loss with the extra training; "explanation vs the control" does not.
Writes checkpoints/<name>/variants.{md,csv}: per seed and variant CIDEr-D, class similarity, class rank (lower is
better), attribute precision / recall and the sentence classifier's accuracy on the generated sentences (validation
set, greedy decoding), then the mean over seeds and the explanation model's CIDEr-D and attribute-recall changes
against explanation-label and against the control.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path
from typing import Any

from benchmarks import CONFIGS
from benchmarks.devices import add_device_argument, trainer_overrides
from zoo.cli.lightning import ZooCLI
from zoo.cli.report import write_report

CONTROL = "explanation-label, same budget (weight 0)"
RUNS = [  # (run name, config stem, run it starts from, overrides, label)
    ("description", "description", None, [], None),
    ("definition", "definition", None, [], None),
    ("explanation_label", "explanation_label", None, [], None),
    ("explanation_dis", "explanation_dis", "description", [], None),
    ("explanation", "explanation", "explanation_label", [], None),
    ("explanation_label_same_budget", "explanation", "explanation_label",
     ["--model.init_args.discriminative_weight=0"], CONTROL),
]


def run_chain(folder: Path, seed: int, extra: list[str]) -> list[dict[str, Any]]:
    last = lambda run: str(folder / run / "checkpoints" / "last.ckpt")  # noqa: E731
    rows = []
    for run, stem, start, overrides, label in RUNS:
        shared = [] if run == "description" else [f"--model.init_args.encoder_checkpoint={last('description')}",
                                                    f"--model.init_args.sentence_classifier_checkpoint="
                                                    f"{last('description')}"]
        chained = [f"--model.init_args.init_checkpoint={last(start)}"] if start else []
        cli = ZooCLI(args=["--config", str(CONFIGS / "textual" / f"{stem}.yaml"), *shared, *chained,
                           *overrides, f"--seed_everything={seed}", "--progress_bar.refresh_rate=0", *extra,
                           f"--trainer.logger.init_args.save_dir={folder.parent}",
                           f"--trainer.logger.init_args.name={folder.name}/{run}"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        rows.append({"seed": seed, "variant": label or cli.model.hparams.variant, "from": start or "",
                     **{k.removeprefix("val/"): round(float(v), 4) for k, v in sorted(metrics.items())
                        if k != "val/loss"}})
    return rows


def summarise(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Mean over seeds per variant, and per seed the explanation model's relative CIDEr-D change and attribute
    recall change against explanation-label (stage 1) and against the equal-budget control."""
    metrics = [k for k in rows[0] if k not in ("seed", "variant", "from")]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    means = [{"variant": v, "seeds": sum(r["variant"] == v for r in rows),
              **{m: round(statistics.fmean(r[m] for r in rows if r["variant"] == v), 4) for m in metrics
                 if all(m in r for r in rows if r["variant"] == v)}} for v in variants]
    changes = []
    for seed in dict.fromkeys(r["seed"] for r in rows):
        by_variant = {r["variant"]: r for r in rows if r["seed"] == seed}
        explanation = by_variant["explanation"]
        for against in ("explanation-label", CONTROL):
            other = by_variant[against]
            changes.append({"seed": seed, "explanation vs": against,
                            "cider_d change %": round(100 * (explanation["cider_d"] / other["cider_d"] - 1), 1)
                            if other["cider_d"] else float("nan"),
                            "attribute_recall change": round(explanation.get("attribute_recall", float("nan"))
                                                             - other.get("attribute_recall", float("nan")), 4)})
    return means, changes


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="textual_variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_device_argument(parser)
    args, extra = parser.parse_known_args(argv)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    folder = Path("checkpoints") / args.name
    extra = [*trainer_overrides(args.device), *extra]
    rows = [row for seed in args.seeds for row in run_chain(folder / f"seed{seed}", seed, extra)]
    means, changes = summarise(rows)
    write_report(folder, {"variants": rows, "mean_over_seeds": means, "explanation_changes": changes},
                 stem="variants")
    return rows


if __name__ == "__main__":
    main()

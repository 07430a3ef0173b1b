"""Data efficiency on rule_series: validation accuracy of ReNN, the opaque 1-D CNN and the LSTM trained on 5, 10,
25 and 100 % of the training split, each point averaged over seeds; plus how well ReNN's rule map fires on the
ground-truth rule events (precision / recall).

    python -m benchmarks.renn_data_efficiency [--fractions 0.05 0.1 0.25 1.0] [--seeds 0 1] [--name renn_data]
        [--subset-per-seed] [--device cpu|cuda] [fit overrides, e.g. --trainer.max_epochs=2]

Every point is a `train.py ablate` grid point (checkpoints/<name>/<model>/<point>/, resumable: finished points are
skipped when the command runs again); every model's run is built and checked before the first trains, so an
override one model's config refuses is said before any training. Every model gets the same number of optimiser steps
at every fraction (the datamodule draws a full-size epoch from the kept subset), so the curve measures data, not
budget. Writes checkpoints/<name>/data_efficiency.{md,csv} and data_efficiency.png.

The training subset of a fraction is, by default, one draw (the datamodule's `subset_seed` None: seeded by its data
`seed`), the same for every seed and model: "mean +- std over seeds" is then a spread over initialisation and batch
order only. `--subset-per-seed` draws one subset per seed (`data.init_args.subset_seed` = the seed, a point of its
own: `subset_seed=<seed>` in its folder name; fraction 1 keeps everything and shares the default points), so the
spread covers which samples were kept too. Means leave out NaN values (a rule precision where no rule fired).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import CONFIGS
from benchmarks.devices import add_device_argument, trainer_overrides
from zoo.cli.ablate import check_points, grid_points, run_grid_point
from zoo.cli.errors import command_line, is_configuration_error, mark
from zoo.cli.report import write_report

MODELS = {
    "renn": "renn/rule_series.yaml",
    "cnn": "baselines/rule_series_cnn.yaml",
    "lstm": "baselines/rule_series_lstm.yaml",
}
FRACTION_KEY = "data.init_args.train_fraction"
SUBSET_KEY = "data.init_args.subset_seed"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation of the values that are not NaN (a metric with nothing to score: a rule precision
    where no rule fired); NaN and 0 when none is left."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def model_points(fractions: list[float], seeds: list[int], subset_per_seed: bool = False) -> list[dict[str, Any]]:
    """The grid points every model runs: each fraction with each seed (and, with `subset_per_seed`, below fraction 1
    the seed's own training subset)."""
    points = grid_points({FRACTION_KEY: fractions, "seed_everything": seeds})
    return [{**point, SUBSET_KEY: point["seed_everything"]} if subset_per_seed and point[FRACTION_KEY] < 1 else point
            for point in points]


def check_every_model(name: str, point: dict[str, Any], extra: list[str]) -> None:
    """Build and check each model's run at grid point `point` (`zoo.cli.ablate.check_points`: parse, build,
    preflight) before any trains: the fit overrides go to every model, and one a baseline refuses (a ReNN `stages:`
    schedule) was found only after ReNN's points had trained, with a traceback. One point per model is enough: the
    points differ only in the benchmark's own fraction and seed (`main` checks the fractions). The error names the
    model and its config."""
    for model, config in MODELS.items():
        try:
            check_points(str(CONFIGS / config), f"{name}/{model}", [point], extra)
        except SystemExit:  # the parser said the error: add which model's config it was
            sys.stderr.write(f"({model}: {config}; the fit overrides go to every model)\n")
            raise
        except Exception as error:
            if not is_configuration_error(error):
                raise
            raise mark(ValueError(f"{model} ({config}): {error}\nThe fit overrides go to every model "
                                  f"({', '.join(MODELS)}); give only those each model's config takes.")) from None


def measure(name: str, fractions: list[float], seeds: list[int], extra: list[str], subset_per_seed: bool = False
            ) -> dict[str, dict[float, list]]:
    """{model: {fraction: [metrics of each seed]}}. `subset_per_seed`: each seed trains on its own subset of the
    training split (`subset_seed` = the seed, below fraction 1); else every seed on the data seed's one subset.
    `main` checks every model (`check_every_model`) before this trains the first."""
    points = model_points(fractions, seeds, subset_per_seed)
    results: dict[str, dict[float, list]] = {}
    for model, config in MODELS.items():
        results[model] = {}
        for point in points:
            metrics, _ = run_grid_point(str(CONFIGS / config), f"{name}/{model}", point, extra)  # (metrics, directions)
            results[model].setdefault(point[FRACTION_KEY], []).append(metrics)
    return results


def table(results: dict[str, dict[float, list]], fractions: list[float]) -> list[dict[str, Any]]:
    rows = []
    for fraction in fractions:
        row: dict[str, Any] = {"train_fraction": fraction}
        for model, by_fraction in results.items():
            mean, std = mean_std([m["acc"] for m in by_fraction[fraction]])
            row[f"{model}_acc"] = f"{mean:.3f} +- {std:.3f}"
        renn = results["renn"][fraction]
        best_baseline = max(mean_std([m["acc"] for m in results[b][fraction]])[0] for b in results if b != "renn")
        row["renn_minus_best_baseline"] = round(mean_std([m["acc"] for m in renn])[0] - best_baseline, 3)
        for key in ("rule_precision", "rule_recall"):
            if key in renn[0]:
                row[f"renn_{key}"] = round(mean_std([m[key] for m in renn])[0], 3)
        rows.append(row)
    return rows


def save_figure(path: Path, results: dict[str, dict[float, list]], fractions: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.8, 3.4))
    for model, by_fraction in results.items():
        stats = [mean_std([m["acc"] for m in by_fraction[f]]) for f in fractions]
        axis.errorbar([100 * f for f in fractions], [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                      capsize=3, label=model)
    axis.set_xscale("log")
    axis.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
    axis.set_xlabel("training data used")
    axis.set_ylabel("validation accuracy")
    axis.set_title("rule_series: data efficiency", fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--name", default="renn_data_efficiency")
    parser.add_argument("--subset-per-seed", action="store_true",
                        help="draw the training subset of each fraction once per seed (data.init_args.subset_seed = "
                             "the seed), so the std over seeds covers the subset too; default: one subset, drawn "
                             "with the data seed, for every seed")
    add_device_argument(parser)
    args, extra = parser.parse_known_args(argv)
    if any(arg.split("=", 1)[0] == f"--{SUBSET_KEY}" for arg in extra) and args.subset_per_seed:
        parser.error(f"--subset-per-seed sets --{SUBSET_KEY} to each seed; give one or the other.")
    if not all(0 < fraction <= 1 for fraction in args.fractions):
        parser.error(f"--fractions are shares of the training split, in (0, 1]; got {args.fractions}.")
    extra = ["--progress_bar.refresh_rate=0", *trainer_overrides(args.device), *extra]
    check_every_model(args.name, model_points(args.fractions, args.seeds, args.subset_per_seed)[0], extra)
    results = measure(args.name, args.fractions, args.seeds, extra, args.subset_per_seed)
    rows = table(results, args.fractions)
    folder = Path("checkpoints") / args.name
    write_report(folder, {"data_efficiency": rows}, stem="data_efficiency")
    save_figure(folder / "data_efficiency.png", results, args.fractions)
    return rows


if __name__ == "__main__":
    command_line(main)  # a configuration error said once, without a traceback (exit status 2)

"""L2X and INVASE against Captum's post-hoc explainers on the same frozen black box (the L2X paper's Figure 2/3
experiment, plus digits 3 vs 8 on 2x2 patches, plus labelled sentences from a CSV/TSV file such as Rotten Tomatoes,
k words per sentence), in one run.

    python -m benchmarks.l2x_race --config benchmarks/l2x_race.yaml [--name l2x_race] [--datasets xor switch]
        [--device cpu|cuda]

Per dataset: a black box (MLP; tiny CNN for digits; text CNN for sentences) and an EVAL-X evaluator (same
architecture, random masks) are trained and frozen inside the L2X run; INVASE then loads the same two. Every method
explains the same test samples for the black box's predicted class: L2X and INVASE by one forward pass, Captum's
Saliency, InputXGradient, IntegratedGradients, DeepLift, KernelShap and Lime (default sample counts) by attribution
(on sentences: of each word's presence, `zoo.explain.captum.TokenPresence`; INVASE has no text model and sits out).
"lime:5000" / "kernel_shap:2128" in `methods` run those two with that many perturbations per sample (the original
packages' defaults) beside Captum's defaults; "random" (k features drawn uniformly) is the floor. Attributions
are turned into a top-k selection (k = the true set size; INVASE selects its own number), then scored the same
way: median rank of the true features, TPR/FDR, post-hoc accuracy (black box on the selection agrees with the
black box) and EVAL-X accuracy (evaluator on the selection vs the label).

Timing (`benchmarks.timing`, the device synchronised): batched methods are timed `repeats` times over all samples
after one warm-up call (median); KernelShap and Lime explain one sample at a time (Captum fits one surrogate per
sample), timed per sample (median). Training and explaining run on `--device`. Writes
checkpoints/<name>/race.{md,csv}, speed.csv and median_rank_boxplot.png; for sentences also
checkpoints/<name>/<dataset>/selected_words.md (the words each method kept, for a person to read).

Sentence tasks are named under `text_data:` in the config (CSVTextDataModule arguments plus `k`), e.g.
    text_data:
      rotten_tomatoes: {path: data/rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2, label_column: category,
                        labels: [rotten, fresh], max_len: 50, k: 5}
"""

from __future__ import annotations

import argparse
import collections
import functools
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml

from benchmarks.devices import add_device_argument, trainer_kwargs
from benchmarks.timing import median_time
from datamodules import CSVTextDataModule, DigitsDataModule, L2XSyntheticDataModule
from datamodules.l2x_synthetic import DATASETS, NUM_SELECTED
from zoo.cli.compare import SampleCounter
from zoo.cli.report import write_report
from zoo.explain.captum import FEATURE_METHODS, perturbation_samples
from zoo.l2x.scores import EXPLANATION_DIRECTIONS, RANDOM, compare_explainers
from zoo.l2x.system import L2XSystem

SELECTORS = ("l2x", "invase")


def task_setting(task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Datamodule, selector models, black box and k of one task (a synthetic dataset or digits_3v8)."""
    tau = settings.get("tau", 0.1)
    if task in DATASETS:
        k = NUM_SELECTED[task]
        return {"data": L2XSyntheticDataModule(dataset=task, seed=settings.get("seed", 0), **settings["data"]),
                "input_key": "features", "k": k, "black_box": "baseline_mlp",
                "models": {"l2x": ("l2x_vector", {"k": k, "tau": tau}), "invase": ("invase_vector", {})}}
    if task == "digits_3v8":
        patch = {"patch_size": 2}
        return {"data": DigitsDataModule(classes=[3, 8], image_size=8, seed=settings.get("seed", 0),
                                         batch_size=settings.get("digits_batch_size", 64)),
                "input_key": "image", "k": 4, "black_box": "baseline_smallcnn",
                "models": {"l2x": ("l2x_patches", {"k": 4, "tau": tau, **patch}), "invase": ("invase_patches", patch)}}
    text = (settings.get("text_data") or {}).get(task)
    if text is not None:
        k = text.get("k", 5)
        data = CSVTextDataModule(seed=settings.get("seed", 0), **{key: v for key, v in text.items() if key != "k"})
        return {"data": data, "input_key": "tokens", "k": k, "black_box": "baseline_textcnn",
                "models": {"l2x": ("l2x_tokens", {"k": k, "tau": settings.get("text_tau", 0.5)})}}
    known = [*DATASETS, "digits_3v8", *(settings.get("text_data") or {})]
    raise ValueError(f"Unknown race task {task!r}; choose from {known}.")


def train_selector(name: str, task: str, which: str, setting: dict[str, Any], settings: dict[str, Any],
                   frozen: Path | None) -> tuple[L2XSystem, float]:
    """Fit one selector system; with `frozen`, its black box and evaluator are loaded from that file."""
    data = setting["data"]
    model_name, model_kwargs = setting["models"][which]
    system = L2XSystem(
        model_name=model_name, num_classes=data.num_classes, in_chans=data.num_channels, image_size=data.image_size,
        data_inputs=data.model_inputs, model_kwargs=model_kwargs, black_box=setting["black_box"],
        black_box_epochs=settings["black_box_epochs"], evaluator_epochs=settings["evaluator_epochs"],
        black_box_checkpoint=str(frozen) if frozen else None, evaluator_checkpoint=str(frozen) if frozen else None,
        optimizer=functools.partial(torch.optim.Adam, lr=settings.get("lr", 1e-3),
                                    weight_decay=settings.get("weight_decay", 1e-3)),
        input_key=setting["input_key"],
    )
    counter = SampleCounter("train")  # the selector's own training batches, as compare times them
    trainer = pl.Trainer(
        max_epochs=settings["epochs"], **trainer_kwargs(settings["device"]), enable_checkpointing=False,
        callbacks=[counter], enable_progress_bar=False, enable_model_summary=False,
        logger=pl.loggers.TensorBoardLogger("checkpoints", name=f"{name}/{task}", version=which),
        limit_train_batches=settings.get("limit_train_batches"),
    )
    # train_s: the selector's batches only; L2X trains its black box and evaluator in this fit, INVASE loads them
    # frozen, and timing the whole fit charged L2X with them (4.1 s against 0.5 s for the same selector epochs)
    trainer.fit(system, datamodule=data)
    return system.to(settings["device"]).eval(), counter.seconds(trainer)  # the Trainer hands it back on the CPU


def race_task(name: str, task: str, settings: dict[str, Any], methods: list[str]) -> tuple[list[dict], dict]:
    """Train the selectors, explain the test samples with every method, score them; rows and per-sample ranks."""
    pl.seed_everything(settings.get("seed", 0), verbose=False)
    setting = task_setting(task, settings)
    folder = Path("checkpoints") / name / task
    systems, train_seconds = {}, {}
    systems["l2x"], train_seconds["l2x"] = train_selector(name, task, "l2x", setting, settings, None)
    folder.mkdir(parents=True, exist_ok=True)
    frozen = folder / "black_box_and_evaluator.pt"
    torch.save({k: v for k, v in systems["l2x"].state_dict().items() if k.startswith(("black_box.", "evaluator."))},
               frozen)
    methods = [m for m in methods if m not in SELECTORS or m in setting["models"]]
    if "invase" in methods:
        systems["invase"], train_seconds["invase"] = train_selector(name, task, "invase", setting, settings, frozen)
    test = {key: tensor.to(settings["device"]) for key, tensor in setting["data"].splits["test"].tensors.items()}
    count = min(settings["num_explained"], len(test[setting["input_key"]]))
    relevant = test.get("relevant")
    device = torch.device(settings["device"])
    explained = compare_explainers(
        {which: system.model for which, system in systems.items()}, systems["l2x"].black_box,
        systems["l2x"].evaluator, test[setting["input_key"]][:count], test["label"][:count],
        None if relevant is None else relevant[:count], setting["k"], methods, settings["num_explained_perturbation"],
        settings.get("repeats", 5), lambda function, repeats, warmup: median_time(function, device, repeats, warmup))
    rows = [{"dataset": task, **row, "train_s": round(train_seconds.get(row["method"], 0.0), 2)}
            for row in explained.rows]
    if setting["input_key"] == "tokens":
        write_selected_words(folder / "selected_words.md", setting["data"], test["tokens"][:count],
                             test["label"][:count], explained.selections, settings.get("words_shown", 40))
    return rows, explained.ranks


def write_selected_words(path: Path, data: CSVTextDataModule, tokens: torch.Tensor, label: torch.Tensor,
                         selections: dict[str, torch.Tensor], shown: int) -> None:
    """A page for a person: the first `shown` test sentences with the words each method kept in **bold**, and each
    method's most often kept words per class."""
    lines = [f"# Words kept per sentence ({', '.join(selections)})", ""]
    for i in range(min(shown, len(tokens))):
        lines.append(f"**{i}** ({data.class_names[int(label[i])]}): {data.decode(tokens[i])}")
        lines += [f"- {method}: {data.decode_selection(tokens[i].cpu(), selection[i].cpu())}"
                  for method, selection in selections.items() if i < len(selection)]
        lines.append("")
    lines += ["# Most often kept words, per class", "", "| method | class | words (times kept) |",
              "| --- | --- | --- |"]
    for method, selection in selections.items():
        for class_id, class_name in enumerate(data.class_names):
            rows = (label[: len(selection)] == class_id).nonzero()[:, 0]
            kept = tokens[rows][selection[rows] > 0.5].tolist()
            counts = collections.Counter(data.vocabulary[t] for t in kept if t > 1)
            lines.append(f"| {method} | {class_name} | "
                         f"{', '.join(f'{word} ({n})' for word, n in counts.most_common(15))} |")
    path.write_text("\n".join(lines) + "\n")


def speed_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """L2X's samples/s divided by every other method's, per dataset (the same run, the same machine)."""
    out = []
    for task in dict.fromkeys(r["dataset"] for r in rows):
        by_method = {r["method"]: r["samples_per_s"] for r in rows if r["dataset"] == task and "samples_per_s" in r}
        if "l2x" in by_method:
            out.append({"dataset": task, **{f"l2x_vs_{m}": round(by_method["l2x"] / v, 1)
                                            for m, v in by_method.items() if m != "l2x"}})
    return out


def save_boxplot(path: Path, ranks: dict[str, dict[str, torch.Tensor]], optimum: dict[str, float]) -> None:
    """One panel per dataset, one box per method: the distribution of per-sample median ranks (paper's Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ranks if ranks[t]]
    if not tasks:
        return
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        methods = list(ranks[task])
        axis.boxplot([ranks[task][m].numpy() for m in methods], showfliers=False)
        axis.set_xticks(range(1, len(methods) + 1), methods, rotation=60, fontsize=8)
        axis.axhline(optimum[task], color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(task, fontsize=9)
        axis.set_ylabel("median rank of true features")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).with_name("l2x_race.yaml")))
    parser.add_argument("--name", help="output folder under checkpoints/ (default: the config's name)")
    parser.add_argument("--datasets", nargs="+", help="subset of the config's datasets")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    settings = yaml.safe_load(Path(args.config).read_text())
    name = args.name or settings.get("name", "l2x_race")
    methods = settings.get("methods", [*SELECTORS, *FEATURE_METHODS])
    known = {*SELECTORS, *FEATURE_METHODS, RANDOM}
    unknown = sorted({m for m in methods if perturbation_samples(m)[0] not in known})
    if unknown or "l2x" not in methods:
        raise ValueError(f"methods must include l2x and come from {sorted(known)} (KernelShap and Lime with a sample "
                         f"count too, e.g. lime:5000); got {unknown}.")
    rows, ranks = [], {}
    for task in args.datasets or settings["datasets"]:
        task_settings = {**settings, **(settings.get("overrides") or {}).get(task, {}), "device": args.device}
        task_rows, ranks[task] = race_task(name, task, task_settings, methods)
        rows += task_rows
    folder = Path("checkpoints") / name
    # race.md's legend: the explanation columns' directions, and train_s a cost (seconds); speed's ratios none
    directions = EXPLANATION_DIRECTIONS | {"train_s": False}
    write_report(folder, {"race": rows, "speed": speed_rows(rows)}, directions, stem="race")
    optimum = {t: (NUM_SELECTED[t] + 1) / 2 for t in ranks if t in NUM_SELECTED}
    save_boxplot(folder / "median_rank_boxplot.png", ranks, optimum)
    return rows


if __name__ == "__main__":
    main()

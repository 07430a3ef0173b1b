"""`train.py compare`: a family config against the twins its System declares, or a compare spec; one report."""

from __future__ import annotations

import contextlib
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states

from zoo.checks import close_names
from zoo.cli.errors import configuration_phase, is_configuration_error, mark
from zoo.cli.lightning import ParsedCLI, ZooCLI, fit, refuse_empty_budget
from zoo.cli.preflight import check_no_print_config, preflight
from zoo.cli.report import metric_directions, write_report
from zoo.cli.runs import move_earlier_reports, move_earlier_run
from zoo.distributed import all_reduce_, rank_local
from zoo.engine.callbacks import logged_step, logger_folder, scoring_logged_apart
from zoo.engine.system import convert_for_precision
from zoo.figures import log_figure, save_figure
from zoo.explain.scores import (EXPLANATION_DIRECTIONS, ExplainedRun, check_explain_settings, explained_run,
                                explanation_figure, explanation_directions, explanation_note)
from zoo.weights import checkpoint_replaces_weights, load_system_weights

COMPARE_HELP = """\
--config takes a family config (it is trained with every opaque twin its System declares in TWINS, e.g.
ICNNSystem: ordinary_twin, masked_twin, plain_cnn) or a compare spec, a YAML file with one top-level key:

compare:
  name: quickstart                      # report folder: checkpoints/<name>/ (--name overrides it; without a
                                        # name: <folder>_<stem> of the spec, e.g. icnn_compare_twins)
  args: ["--trainer.max_epochs=6"]      # overrides shared by every run
  runs:
    icnn: {config: configs/icnn/parts_world.yaml}
    opaque_twin: {config: configs/icnn/parts_world.yaml, args: ["--model.init_args.loss...weight=0"]}
    trained: {config: ..., checkpoint: checkpoints/x/checkpoints/last.ckpt}   # evaluate, do not train
    again: {config: checkpoints/x/config.yaml}   # a run's own saved config (its ckpt_path is not used)
    ordinary: {config: configs/icnn/parts_world.yaml, twin: ordinary_twin}   # a twin its System declares (TWINS)
  explain:                              # optional: explainers scored on validation images, each map for the
                                        # image's true class (+ a `random` reference row for every model)
    methods: [cam, saliency, integrated_gradients, layer_gradcam, occlusion]
    num_images: 32                      # drawn once, class-stratified, from a fixed seed: the same for every run
    step: 128                           # pixels per deletion/insertion step (series: time steps, default 4)
    metrics: [deletion, insertion, road, infidelity]   # the default; + sensitivity (reruns each explainer: slow)

Every run has the same data, seed_everything and training budget (the trainer's max_epochs, max_steps, min_epochs,
min_steps, max_time, limit_train_batches, accumulate_grad_batches, fast_dev_run and its EarlyStopping callbacks;
other callbacks are not compared), or compare stops before any run trains. A `checkpoint:` run is evaluated, not
trained: where the config.yaml of its checkpoint's run folder holds another budget (or there is none), that is said.
A run the spec lists that equals another in every setting (config, args, checkpoint) runs too (a check that runs
reproduce: their rows should agree), which is said; a declared twin that does is dropped, and said so.

A spec's keys are name, args, runs and explain; a run's are config, args, checkpoint and twin (a twin takes no args
of its own: it is the declared twin of its config). Any other key is refused before any run trains.

Options on the command line go to every run, except that a twin of another System class (L2X's black_box, a
ClassifierSystem) is not given the --model.init_args options its class does not take (said once). A declared twin
is the config as the command line leaves it (its model name, backbone, pretrained_path, ...) with the twin's own
options applied last: `--model.init_args.model_name icnn_resnet18` makes plain_cnn a baseline_resnet18 on the same
pretrained_path, and no command-line option undoes what makes a twin a twin. A twin that drops the config's
callbacks (L2X's black_box: its selection pictures) keeps those of the spec's args and the command line.

A family config's report goes to checkpoints/<folder>_<stem>_compare/, named after the config's folder and file
(configs/icnn/parts_world.yaml: icnn_parts_world_compare; a config in the working directory: <stem>_compare), so
the parts_world.yaml of every family has its own; --name overrides it. Each run is seeded and built as `train.py
fit` of its config.yaml would be and starts its fit from the random state it had when built, so a run is
reproduced by `train.py fit --config checkpoints/<name>/<run>/config.yaml`, whatever ran before it (that fit, and
a compare of the same name again, first move the run found in the folder to checkpoints/<name>/stale/<run>-<time>/;
a compare again moves the earlier report to checkpoints/<name>/stale/report-<time>/ before its first run trains).

Every run is scored with its last weights, as its fit left them (the `weights` column), not its best-*.ckpt. The
throughput columns time the run's own training / validation batches only (not helper models, validation inside
fit, epoch-end pictures or checkpoints).
"""
FIT_ONLY_KEYS = ("ckpt_path", "weights_only")  # `fit` arguments in a run's saved config.yaml; compare runs lack them
SPEC_KEYS = ("name", "args", "runs", "explain")  # a compare spec's keys (under `compare:`)
RUN_KEYS = ("config", "args", "checkpoint", "twin")  # a spec run's keys
CONFIG_FIRST_OPTIONS = ("--trainer.callbacks",)  # a twin's options on these go before the spec's and command line's
# the trainer settings that decide how much a run trains (with its EarlyStopping callbacks, `training_budget`)
BUDGET_KEYS = ("max_epochs", "max_steps", "min_epochs", "min_steps", "max_time", "limit_train_batches",
               "accumulate_grad_batches", "fast_dev_run")
EARLY_STOPPING = "trainer.callbacks (EarlyStopping)"
# what a compare writes in its report folder (`write_report`'s tables and the explanation figure)
REPORT_FILES = ("report.md", "report.csv", "models.csv", "explanations.csv", "explanations.png")


def declared_twins(config_path: str | Path, config: dict[str, Any], twin: str | None = None) -> dict[str, list[str]]:
    """The twins the config's System declares (`TWINS`), with `{backbone}` filled from the model name,
    `{<init arg>}` from the System's init arguments (the config's, else the System's defaults; non-strings as
    JSON, None as null) and `{shared_model_kwargs}` with the config's model_kwargs that the twin's model (the
    model_name the twin sets) takes: a plain classifier twin keeps the backbone, its pretrained_path, drop_rate, ...
    and leaves out the family's own settings. `config` is the config as the run resolves it: `_fit_args` passes the
    config with the command line's options applied (`resolved_model_config`), so the twins follow them, and names
    the `twin` whose run it builds: only that one is resolved, and what it leaves out is said."""
    import importlib
    import inspect
    import json

    model = config.get("model") or {}
    class_path = model.get("class_path") if isinstance(model, dict) else None
    if not class_path or "." not in class_path:
        raise ValueError(f"{config_path} is neither a compare spec nor a fit config with a model class_path.\n"
                         f"{COMPARE_HELP}")
    module, _, name = class_path.rpartition(".")
    system = getattr(importlib.import_module(module), name)
    twins = getattr(system, "TWINS", {})
    if not twins:
        raise ValueError(f"{name} declares no twins (it is an opaque model): list the runs in a compare spec.\n"
                         f"{COMPARE_HELP}")
    init_args = {name: parameter.default for name, parameter in inspect.signature(system).parameters.items()
                 if parameter.default is not inspect.Parameter.empty} | (model.get("init_args") or {})
    fields = {name: value if isinstance(value, str) else json.dumps(value) for name, value in init_args.items()
              if value is None or isinstance(value, (str, int, float, bool, list, dict))}
    fields["backbone"] = backbone_part(str(init_args.get("model_name", "")))
    if twin is not None and twin not in twins:
        close = close_names(str(twin), list(twins))
        raise ValueError(f"{config_path}: {name} declares no twin {twin!r}"
                         f"{' (did you mean ' + ', '.join(map(repr, close)) + '?)' if close else ''}; its twins: "
                         f"{', '.join(twins)}.")
    resolved = {}
    for name, args in twins.items() if twin is None else [(twin, twins[twin])]:
        twin_fields = fields
        if any("{shared_model_kwargs}" in arg for arg in args):
            named = [arg.split("=", 1)[1].format(**fields) for arg in args if arg.startswith(MODEL_NAME_OPTION)]
            model_name = named[-1] if named else str(init_args.get("model_name", ""))
            model_kwargs = init_args.get("model_kwargs") or {}
            shared = shared_model_kwargs(model_name, model_kwargs)
            if twin is not None and shared.keys() != model_kwargs.keys():
                print(f"compare: twin {name!r} ({model_name}) does not take model_kwargs "
                      f"{', '.join(k for k in model_kwargs if k not in shared)}; not passed to it.")
            twin_fields = fields | {"shared_model_kwargs": json.dumps(shared)}
        resolved[name] = [arg.format(**twin_fields) for arg in args]
    return resolved


MODEL_NAME_OPTION = "--model.init_args.model_name="


def shared_model_kwargs(model_name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The entries of the family's `model_kwargs` that the twin's model `model_name` takes (its factory's and its
    class's keyword arguments): the backbone and how it starts (pretrained_path, drop_rate, freeze_backbone) stay
    the same; the family's own settings (ICNN's tau_scale) are left out."""
    from zoo.registry import model_arguments

    taken = set(model_arguments(model_name))  # annotated or not, as `create_model` checks them
    return {key: value for key, value in model_kwargs.items() if key in taken}


def backbone_part(model_name: str) -> str:
    """`{backbone}` of a twin: the model name less its family's prefix ("tinycnn" of aog_rcnn_tinycnn and of
    icnn_tinycnn), else less its first "_"-separated part (a model named otherwise than its family, cem_tinycnn)."""
    from zoo.registry import list_models, model_family

    family = model_family(model_name) if model_name in list_models() else ""
    if family and model_name.startswith(f"{family}_"):
        return model_name.removeprefix(f"{family}_")
    return model_name.split("_", 1)[-1]


def default_name(path: str | Path) -> str:
    """A report folder name of its own for each config file: its folder and stem ("icnn_parts_world" for
    configs/icnn/parts_world.yaml; every family has a parts_world.yaml), the stem alone for a file in the working
    directory or directly in a configs/ folder. Characters unsafe in a path or a YAML scalar (the logger name is
    parsed) become "_"."""
    path = Path(path).resolve()
    folder = path.parent
    name = path.stem if folder == Path.cwd().resolve() or folder.name in ("configs", "") else \
        f"{folder.name}_{path.stem}"
    return re.sub(r"[^\w.=,+-]", "_", name)


def read_compare_spec(path: str | Path) -> dict[str, Any]:
    """A compare spec, or for a fit config the implied one: the config against every twin its System declares,
    reported in checkpoints/<folder>_<stem>_compare/ (`default_name`). A twin's run holds its args as the config
    file alone resolves them and `twin: <name>`: `_fit_args` resolves them again with the command line's options."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if "compare" not in spec:
        family = str((spec.get("model") or {}).get("class_path", "")).split(".")[1:2] or ["model"]
        runs = {family[0]: {"config": str(path)}}
        runs |= {twin: {"config": str(path), "args": args, "twin": twin}
                 for twin, args in declared_twins(path, spec).items()}
        return {"name": f"{default_name(path)}_compare", "runs": runs}
    if isinstance(spec.get("compare"), dict) and "runs" not in spec["compare"]:  # `run:`: say the key it lacks
        typos = {key: close for key in spec["compare"] if key not in SPEC_KEYS
                 for close in close_names(str(key), ("runs",), n=1, cutoff=0.6)}
        meant = f" (did you mean 'runs' for {next(iter(typos))!r}?)" if typos else ""
        raise ValueError(f"compare spec {path}: compare has no `runs`{meant}; it lists the runs to train, e.g. runs: "
                         f"{{icnn: {{config: configs/icnn/parts_world.yaml}}}} (train.py compare --help shows a whole "
                         f"spec).")
    if not isinstance(spec.get("compare"), dict) or not spec["compare"].get("runs"):
        raise ValueError(f"{path} is not a compare spec.\n{COMPARE_HELP}")
    check_compare_spec(spec["compare"], path)
    return spec["compare"]


def check_compare_spec(spec: dict[str, Any], path: str | Path) -> None:
    """Raise a ValueError (TypeError) that names the mistake (with the close names) unless the spec holds only
    SPEC_KEYS, its runs are a mapping of mappings of RUN_KEYS, and every `args` is a list: a mistyped key (`arg:`)
    would be read as absent, so the runs would train without it and the report would not say so. A declared twin
    (`twin:`) takes no `args` of its own (its options are its System's `TWINS`), so `args` beside it are refused
    too. The `explain:` block is checked by `check_explain_settings`."""
    def unknown(key: Any, keys: tuple[str, ...], where: str) -> ValueError:
        close = close_names(str(key), keys)
        return ValueError(f"compare spec {path}: {where} has no key {key!r}"
                          f"{' (did you mean ' + ', '.join(map(repr, close)) + '?)' if close else ''}; "
                          f"keys: {', '.join(keys)}.")

    def check_args(args: Any, where: str) -> None:
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise TypeError(f"compare spec {path}: {where}args must be a list of options, e.g. "
                             f"[\"--trainer.max_epochs=6\"]; got {args!r}.")

    for key in spec:
        if key not in SPEC_KEYS:
            raise unknown(key, SPEC_KEYS, "compare")
    check_args(spec.get("args", []), "")
    if not isinstance(spec["runs"], dict):
        raise TypeError(f"compare spec {path}: runs must be a mapping of run name to its config; got "
                         f"{spec['runs']!r}.\n{COMPARE_HELP}")
    for run_name, run in spec["runs"].items():
        if not isinstance(run, dict):
            raise TypeError(f"compare spec {path}: run {run_name!r} must be a mapping with a config (keys: "
                             f"{', '.join(RUN_KEYS)}); got {run!r}.")
        for key in run:
            if key not in RUN_KEYS:
                raise unknown(key, RUN_KEYS, f"run {run_name!r}")
        check_args(run.get("args", []), f"run {run_name!r}: ")
        if run.get("twin") and "args" in run:
            raise ValueError(f"compare spec {path}: run {run_name!r} is the declared twin {run['twin']!r}, whose "
                             f"options are its System's; it takes no args of its own (put options for every run in "
                             f"the spec's args, or list the run without `twin:` and with all its args).")


def resolve_config(path: str, spec_path: Path) -> Path:
    """A run's config path: as given (from the working directory), else relative to a folder above the spec."""
    for candidate in (Path(path), *(folder / path for folder in spec_path.resolve().parents)):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"compare spec {spec_path} names config {path!r}, found neither in the working "
                            f"directory nor relative to a folder above the spec.")


def config_argument(path: Path, command: str = "compare") -> str:
    """What `--config` gets for a run: the path, or for a run's own saved config.yaml (written by `fit`, with the
    `fit`-only keys ckpt_path and weights_only) its text without those keys: compare (and ablate, `command`) trains
    from scratch."""
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict) or not set(FIT_ONLY_KEYS) & set(config):
        return str(path)
    if config.get("ckpt_path"):
        instead = "give the run `checkpoint: <path>` to evaluate trained weights instead" if command == "compare" \
            else "each point resumes only from its own last.ckpt"
        print(f"{command}: {path} resumed from ckpt_path {config['ckpt_path']}; {command} trains from scratch "
              f"({instead}).")
    return yaml.safe_dump({k: v for k, v in config.items() if k not in FIT_ONLY_KEYS}, sort_keys=False)


def _fit_args(run_name: str, run: dict[str, Any], spec_path: Path, common: list[str], extra: list[str]) -> list[str]:
    """The arguments that build a run: its config, the spec's shared args, then its own args and the command line's
    options. A declared twin (`twin: <name>`, `read_compare_spec`) is declared on the config as those options leave
    it (its placeholders filled from the resolved config), and its args come last, so that the command line cannot
    undo what makes it a twin (a model name, a loss weight); except its options on CONFIG_FIRST_OPTIONS keys
    (L2X's black box: `--trainer.callbacks=null`), which come right after the config: they drop what the config
    holds (its selection pictures), and the callbacks the spec's args and the command line give reach the twin as
    they reach every run (an EarlyStopping the family run has and its twin lacked would make the comparison
    unequal)."""
    if "config" not in run:
        raise ValueError(f"compare run {run_name!r} names no config.\n{COMPARE_HELP}")
    config = config_argument(resolve_config(run["config"], spec_path))
    if run.get("twin"):
        model = resolved_model_config(config, [*common, *extra])
        twin_args = declared_twins(run["config"], {"model": model}, run["twin"])[run["twin"]]
        first = [arg for arg in twin_args if option_key(arg) in CONFIG_FIRST_OPTIONS]
        last = [arg for arg in twin_args if option_key(arg) not in CONFIG_FIRST_OPTIONS]
        return ["--config", config, *first, *common, *for_the_runs_system(run_name, {"args": twin_args}, extra),
                *last]
    return ["--config", config, *common, *run.get("args", []), *for_the_runs_system(run_name, run, extra)]


def option_key(arg: str) -> str:
    """The option an argument sets: "--trainer.callbacks=null", "--trainer.callbacks+=X": "--trainer.callbacks"."""
    return arg.split("=", 1)[0].removesuffix("+")


def resolved_model_config(config: str, args: list[str]) -> dict[str, Any]:
    """The `model` section (class_path, init_args) of `config` with `args` applied, as `train.py fit` parses them
    (`*_kwargs` merged, files read); nothing is built or seeded (the random state is left as it was)."""
    model = ParsedCLI(args=["--config", config, *args], run=False).config.model
    return model.as_dict() if hasattr(model, "as_dict") else dict(model)


def for_the_runs_system(run_name: str, run: dict[str, Any], extra: list[str]) -> list[str]:
    """The command line's options for a run whose args swap the System class (a twin of another class, L2X's
    `black_box`: a ClassifierSystem), less the `--model.init_args.<key>` options that class does not take (the
    black box has no `black_box_epochs`): they are the family's, said once and not passed to it. Every other run
    takes them all, so a mistyped one is still refused there."""
    swapped = [arg.split("=", 1)[1] for arg in run.get("args", [])
               if arg.startswith(("--model=", "--model.class_path=")) and "=" in arg]
    if not swapped:
        return extra
    from zoo.cli.errors import init_parameters

    accepted, system = set(init_parameters(swapped[-1])), swapped[-1].rsplit(".", 1)[-1]
    kept, dropped, skip_value = [], [], False
    for index, arg in enumerate(extra):
        if skip_value:
            skip_value = False
            continue
        key = arg.removeprefix("--model.init_args.").split("=", 1)[0].split(".", 1)[0]
        if arg.startswith("--model.init_args.") and accepted and key not in accepted:
            dropped.append(arg.split("=", 1)[0])
            skip_value = "=" not in arg and index + 1 < len(extra) and not extra[index + 1].startswith("--")
            continue
        kept.append(arg)
    if dropped:
        print(f"compare: run {run_name!r} ({system}) does not take {', '.join(dropped)}; not passed to it.")
    return kept


def training_budget(trainer: dict[str, Any]) -> dict[str, Any]:
    """How much a run trains: its trainer's BUDGET_KEYS and its EarlyStopping callbacks (class and init_args; a
    stop on another metric or patience is another budget), from the trainer section as a dict (a parsed config's
    `trainer.as_dict()` or a saved config.yaml's). Other callbacks are not part of it."""
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    stopping = [callback for callback in callbacks if isinstance(callback, dict)
                and "EarlyStopping" in str(callback.get("class_path", "")).rsplit(".", 1)[-1]]
    return {**{f"trainer.{key}": trainer.get(key) for key in BUDGET_KEYS}, EARLY_STOPPING: stopping}


def check_same_setting(configs: dict[str, Any]) -> None:
    """Runs must share data, seed and training budget (`training_budget`: max/min epochs and steps, max_time, batch
    limits, accumulation, fast_dev_run, EarlyStopping), or the comparison says nothing."""
    reference_name, reference = next(iter(configs.items()))
    reference_budget = training_budget(reference.trainer.as_dict())
    for name, config in configs.items():
        budget = training_budget(config.trainer.as_dict())
        for key, value, expected in (
            ("data", config.data, reference.data),
            ("seed_everything", config.seed_everything, reference.seed_everything),
            *((key, budget[key], reference_budget[key]) for key in budget),
        ):
            if value != expected:
                raise ValueError(f"compare runs {reference_name!r} and {name!r} differ in {key}: {expected} vs "
                                 f"{value}. Same data, seed and budget are required; set it in the shared args.")


def run_settings(config: Any, checkpoint: Any = None) -> dict[str, Any]:
    """Everything a run is built from (`config`, its parsed config) but its logger's name (`<report>/<run>`, each
    run's own) and the config file's path (the same settings from another file are the same run), with the
    `checkpoint` it evaluates: two runs with equal settings are one run twice."""
    settings = {key: value for key, value in config.as_dict().items() if key != "config"}
    loggers = settings.get("trainer", {}).get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
            logger["init_args"].pop("name", None)
    return settings | {"checkpoint": checkpoint}


def drop_twins_equal_to_the_model(runs: dict[str, Any], clis: dict[str, Any]) -> dict[str, Any]:
    """A declared twin (`twin:`) equal in every setting (`run_settings`) to a run before it (the textual description
    config against its "description" twin: the twin's options change nothing there) is the same run: dropped, and
    said so. A run the spec lists itself is always kept, also one equal to another (two runs of one config check that
    a run reproduces), which is said; a run that differs in any setting, e.g. `--trainer.gradient_clip_val`, is its
    own run (only `config.model` was compared, and every run with `args` whose model equalled the first run's was
    dropped)."""
    settings = {name: run_settings(clis[name].config, run.get("checkpoint")) for name, run in runs.items()}
    kept: dict[str, Any] = {}
    for name, run in runs.items():
        same = next((other for other in kept if settings[other] == settings[name]), None)
        if same is None:
            kept[name] = run
        elif run.get("twin"):
            print(f"compare: twin {name!r} is the same run as {same!r} in every setting (its System's "
                  f"{run['twin']!r} options change nothing in this config); not trained twice.")
        else:
            print(f"compare: runs {same!r} and {name!r} have the same settings (config, args, checkpoint): both run, "
                  f"and their rows should agree.")
            kept[name] = run
    return kept


def check_checkpoints_outside_trained_runs(runs: dict[str, Any], clis: dict[str, Any]) -> None:
    """Refuse a `checkpoint:` run whose file lies in the run folder of a run this compare trains (the same compare
    run again: `c: {checkpoint: <report>/a/checkpoints/last.ckpt}` beside `a`): run `a` first moves its earlier run
    to stale/ and trains anew, so `c` scored `a`'s new weights, not the file named (and its checks read the old one)."""
    from zoo.cli.runs import inside
    from zoo.engine.callbacks import logger_folder

    trained = {name: logger_folder(clis[name].trainer.logger)
               for name, run in runs.items() if not run.get("checkpoint")}
    for name, run in runs.items():
        for other, folder in trained.items():
            if run.get("checkpoint") and folder is not None and inside(str(run["checkpoint"]), folder):
                raise ValueError(f"compare run {name!r} evaluates {run['checkpoint']}, inside the run folder of run "
                                 f"{other!r} ({folder}), which this compare trains anew (its earlier run moves to "
                                 f"stale/ first): {name!r} would score {other!r}'s new weights. Copy the checkpoint "
                                 f"out of {folder}, or give this compare another --name.")


def checkpoint_budget_notes(runs: dict[str, Any], trainers: dict[str, dict[str, Any]]) -> list[str]:
    """A warning for each `checkpoint:` run whose training budget (`training_budget` of the config.yaml in its
    checkpoint's run folder, <run>/checkpoints/x.ckpt) differs from the runs that train here (`trainers`: each run's
    trainer section as a dict; the first checkpoint run's budget where every run is one), or whose budget is not
    known (no config.yaml there): it is evaluated, never trained, so `check_same_setting` compared only its data and
    model. The checkpoint's epoch and global_step are named where it can be read cheaply (memory-mapped)."""
    trained = [name for name, run in runs.items() if not run.get("checkpoint")]
    budgets = {name: checkpoint_budget(str(run["checkpoint"])) for name, run in runs.items() if run.get("checkpoint")}
    if trained:
        reference_name, reference = trained[0], training_budget(trainers[trained[0]])
    else:
        reference_name = next((name for name, budget in budgets.items() if budget is not None), None)
        reference = budgets.get(reference_name) if reference_name is not None else None
    reference_run = f"run {reference_name!r} " + (
        "trains with" if trained else "(a checkpoint: its run's config.yaml) has")
    notes = []
    for name, budget in budgets.items():
        if name == reference_name or reference is None and budget is None:
            continue
        checkpoint = str(runs[name]["checkpoint"])
        where = f"run {name!r} evaluates checkpoint {checkpoint}{checkpoint_progress(checkpoint)}"
        if budget is None:
            notes.append(f"compare: {where}, whose training budget is not known (no config.yaml in its run folder); "
                         f"{reference_run} {budget_text(reference, reference)}. Its scores may "
                         f"come from another budget.")
        elif budget != reference:
            notes.append(f"compare: {where}, trained with {budget_text(budget, reference)} (its run's config.yaml); "
                         f"{reference_run} {budget_text(reference, budget)}. Its scores come from "
                         f"another training budget.")
    return notes


def checkpoint_budget(checkpoint: str) -> dict[str, Any] | None:
    """`training_budget` of the run that wrote `checkpoint`, from the config.yaml of its run folder (a run's
    checkpoints are in <run>/checkpoints/); None where there is none."""
    path = Path(checkpoint)
    config = path.parent.parent / "config.yaml" if path.parent.name == "checkpoints" else None
    if config is None or not config.is_file():
        return None
    saved = yaml.safe_load(config.read_text()) or {}
    trainer = saved.get("trainer") if isinstance(saved, dict) else None
    return training_budget(trainer) if isinstance(trainer, dict) else None


def checkpoint_progress(checkpoint: str) -> str:
    """" (epoch E, global_step S)" of a checkpoint, read memory-mapped (the weights are not read); "" where it cannot
    be read so."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return f" (epoch {saved['epoch']}, global_step {saved['global_step']})"
    except Exception:  # noqa: BLE001 - only a detail of the message
        return ""


def budget_text(budget: dict[str, Any], other: dict[str, Any]) -> str:
    """The settings of `budget` that differ from `other` ("trainer.max_epochs=3, ..."); all where none differ."""
    differ = [key for key in budget if budget[key] != other.get(key)] or list(budget)
    return ", ".join(f"{key}={budget[key]}" for key in differ)


class SampleCounter(pl.Callback):
    """Counts the samples a run's training or validation batches hold (the System's `batch_size` of each batch, on
    every process) and times those batches: what the throughput columns divide (`samples_per_s`). Counting batches
    read, not optimiser steps, is right under gradient accumulation, limit_*_batches, fast_dev_run, a short last
    batch and several devices.

    Only the batches themselves are timed, from their start hook to their end hook: a training batch's forward,
    backward and optimiser step, a validation batch's forward and metric updates (the batch already on the device).
    The rest of `fit` / `validate` is not: data loading, helper models trained at the fit's start (L2X's black box
    and evaluator: the same run timed 685 samples/s with them and 3618 when the helper cache held them), the sanity
    check, validation inside `fit`, epoch-end work (pushes, pictures, epoch metrics) and checkpoints; timing the whole
    `fit` and `validate` made ProtoPNet infer at 40.6 samples/s against its twin's 596.7 where a plain forward
    differs by 8 %. The counter goes first among the callbacks (`counting`), so other callbacks' batch-end work is
    not timed either. On CUDA each batch gets a pair of timing events, read once when the loop ends (no host-device
    sync per batch); elsewhere `time.perf_counter`. Under `ddp` the time is this rank's, the samples every rank's:
    each rank counts its own batches and the counts are summed once, when the loop ends (one all-reduce, no sync
    inside a step). Multiplying rank zero's batches by the world size overcounted a validation whose samples do not
    split evenly: the evaluation loaders do not repeat samples to even the ranks out (9 counted 10 on 2 ranks).

    A spawning strategy (`ddp_spawn`) runs the loops in worker processes on copies of this callback: rank zero's
    count, time and last epoch and step come back to the main process through `trainer.callback_metrics`, as
    Lightning returns it (`samples`, `seconds`, `last_weights`). A resumed fit whose loop had already ended trains
    no batch and Lightning skips its `on_train_end`: the worker reports at `on_fit_end`, with its trainer's epoch and
    step (the main process's trainer keeps no loop progress, so such an ablate point's `weights` was empty)."""

    def __init__(self, stage: str) -> None:
        self.stage, self._samples, self._seconds = stage, 0, 0.0  # every rank's samples, summed when the loop ends
        self._own = 0  # this rank's samples so far
        self._started: float | torch.cuda.Event | None = None  # the running batch's start
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA batches not read yet
        self._progress: tuple[int, int] | None = None  # (epoch, global step) after the last training batch

    def _returned(self, trainer: pl.Trainer, what: str) -> float | None:
        value = trainer.callback_metrics.get(f"compare/{self.stage}_{what}")
        return None if value is None else float(value)

    def samples(self, trainer: pl.Trainer) -> int:
        """The samples read: counted here, or by a spawned worker's copy and returned in `trainer`'s metrics."""
        return self._samples or int(self._returned(trainer, "samples") or 0)

    def seconds(self, trainer: pl.Trainer) -> float:
        """The summed time of the counted batches (seconds), timed here or by a spawned worker's copy."""
        self._read_events()
        return self._seconds or (self._returned(trainer, "seconds") or 0.0)

    def samples_per_s(self, trainer: pl.Trainer) -> float | str:
        """Samples over the batches' summed time; "" where no batch was counted (a `checkpoint:` run's training)."""
        samples, seconds = self.samples(trainer), self.seconds(trainer)
        return samples / seconds if samples and seconds > 0 else ""

    def last_weights(self, trainer: pl.Trainer) -> str:
        """"last (epoch E, step S)": the weights the last training batch left (E the 0-based epoch, as best-*.ckpt
        names count it, S the global step), counted here or by a spawned worker's copy (the main process's trainer
        keeps no loop progress under ddp_spawn); for a resumed fit that trained no batch (an ablate point whose fit
        had ended), the trainer's; "" where nothing trained."""
        progress = self._progress
        if progress is None and self._returned(trainer, "epoch") is not None:
            progress = (int(self._returned(trainer, "epoch")), int(self._returned(trainer, "step")))
        if progress is None:
            progress = self._ended_progress(trainer)
        return f"last (epoch {progress[0]}, step {progress[1]})" if progress is not None else ""

    @staticmethod
    def _ended_progress(trainer: pl.Trainer) -> tuple[int, int] | None:
        """(epoch, global step) of the last batch a fit that has ended trained, from `trainer`'s progress; None where
        it trained none. `current_epoch` is one past the last epoch once fit ended."""
        if trainer.global_step > 0:
            return max(trainer.current_epoch - 1, 0), trainer.global_step
        return None

    def _read_events(self) -> None:
        """Add the CUDA batches' times: one wait, for the last event (every earlier one is done by then)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000  # ms -> s
            self._events.clear()

    def _sum_ranks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank's samples (`_samples`): this rank's summed over the ranks, one all-reduce when a loop ends
        (every rank runs the loop-end hooks); this rank's alone in one process (no tensor made: nothing to wait
        for on a GPU)."""
        if trainer.world_size <= 1:
            self._samples = self._own
            return
        counted = torch.tensor(self._own, dtype=torch.int64, device=pl_module.device)  # device: NCCL's tensors too
        self._samples = int(all_reduce_(counted, "sum").item())

    def _report(self, trainer: pl.Trainer) -> None:
        self._read_events()
        sent = {"samples": self._samples, "seconds": self._seconds}  # what a spawned worker sends back
        if self._progress is not None:
            sent |= {"epoch": self._progress[0], "step": self._progress[1]}
        for what, value in sent.items():
            trainer.callback_metrics[f"compare/{self.stage}_{what}"] = torch.tensor(float(value), dtype=torch.float64)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "train":
            self._sum_ranks(trainer, pl_module)
            self._report(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report again, with the trainer's progress where no batch was counted: a resumed fit whose loop had ended
        skips the whole loop (`on_train_end` included), and a spawned worker otherwise sent nothing back. No
        collective here: the samples were summed at `on_train_end`, and such a fit counted none."""
        if self.stage == "train":
            if self._progress is None:
                self._progress = self._ended_progress(trainer)
            self._report(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "val" and not trainer.sanity_checking:
            self._sum_ranks(trainer, pl_module)
            self._report(trainer)

    def _start(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record(torch.cuda.current_stream(pl_module.device))
        else:
            self._started = time.perf_counter()

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        started, self._started = self._started, None
        if isinstance(started, torch.cuda.Event):
            ended = torch.cuda.Event(enable_timing=True)
            ended.record(torch.cuda.current_stream(pl_module.device))
            self._events.append((started, ended))
        elif started is not None:
            self._seconds += time.perf_counter() - started
        size = pl_module.batch_size(batch) if hasattr(pl_module, "batch_size") else len(batch)
        self._own += size  # a host-side length: no device read; the ranks' are summed when the loop ends

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.stage == "train":
            self._start(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stage == "train":
            self._end(trainer, pl_module, batch)
            self._progress = (trainer.current_epoch, trainer.global_step)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.stage == "val" and not trainer.sanity_checking:
            self._start(pl_module)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.stage == "val" and not trainer.sanity_checking:
            self._end(trainer, pl_module, batch)


@contextlib.contextmanager
def counting(cli: ZooCLI, stage: str) -> Iterator[SampleCounter]:
    """A `SampleCounter` of `stage` first among the run's callbacks for the duration of the block: its batch-end
    hook, which stops the batch's clock, runs before the other callbacks' (a checkpoint saved every n steps, a
    picture) and Lightning keeps a callback's place (it moves only checkpoint callbacks, to the end)."""
    counter = SampleCounter(stage)
    cli.trainer.callbacks.insert(0, counter)
    try:
        yield counter
    finally:
        cli.trainer.callbacks.remove(counter)


WEIGHTS_NOTE = ("Every run is scored with its last weights, as its fit left them (the `weights` column: the last "
                "training batch's 0-based epoch and global step), not with the best-*.ckpt its checkpoint callback "
                "kept; a `checkpoint:` run with that file's.")
THROUGHPUT_NOTE = ("train_samples_per_s / infer_samples_per_s: the samples of the run's own training / validation "
                   "batches over those batches' summed time (each batch from its start hook to its end hook: "
                   "forward, backward and optimiser step / forward and metric updates; on CUDA by events). Data "
                   "loading, helper models trained at the fit's start (L2X's black box and evaluator), the sanity "
                   "check, validation inside fit, epoch-end work (pushes, pictures) and checkpoints are not timed.")


def compare(spec_path: str, extra: list[str], explain_images: int | None = None, explain: bool = True,
            name: str | None = None) -> list[dict[str, Any]]:
    """Train every run of a compare spec with the same data, seed and budget; evaluate; write report.md/.csv and one
    explanation figure (every run in one figure, one image per column; each run's part also in TensorBoard, in the
    run's validate run ``<run>/validate`` with the scoring validation's val/* points: `scoring_logged_apart`).

    Every run is seeded and built as `train.py fit` seeds and builds it (`seed_everything` before instantiating
    its classes), and its fit starts from the random state the run had right after it was built: the run is
    reproduced by `train.py fit` of its config.yaml, whatever ran before it. `name` (--name) overrides the spec's
    report folder name."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # compare builds its own args
    with configuration_phase():  # a spec, config or run that does not hold: said once, before any training
        check_no_print_config("compare", spec_path, extra)
        spec = read_compare_spec(spec_path)
        explain_settings = spec.get("explain") or {}
        if explain_images is not None and isinstance(explain_settings, dict):
            explain_settings = {**explain_settings, "num_images": explain_images}
        check_explain_settings(explain_settings)  # a mistyped method or key: said now, not after a run trained
        name, common = name or spec.get("name") or default_name(spec_path), list(spec.get("args", []))
        runs = spec["runs"]
        clis, random_states = {}, {}
        for run_name, run in runs.items():  # each seeded, then built, as `train.py fit` does
            with (checkpoint_replaces_weights() if run.get("checkpoint") else contextlib.nullcontext(),
                  naming_the_run(run_name)):  # its arguments or what they build, refused: the run named
                logged = f"--trainer.logger.init_args.name={name}/{run_name}"
                clis[run_name] = ZooCLI(args=_fit_args(run_name, run, Path(spec_path), common, [*extra, logged]),
                                        run=False)
            random_states[run_name] = _collect_rng_states()  # where `train.py fit` starts its fit
            if run.get("checkpoint"):  # data that feeds its model other inputs than it learnt from: refused now
                clis[run_name].check_data_fits_checkpoint(str(run["checkpoint"]))
            else:  # its optimiser, stages' losses and monitors, before any run trains
                with naming_the_run(run_name):
                    preflight(clis[run_name].model, clis[run_name].trainer.callbacks, clis[run_name].datamodule)
                    refuse_empty_budget(clis[run_name].trainer)  # it reported untrained weights
        check_same_setting({run_name: cli.config for run_name, cli in clis.items()})  # before any training starts
        runs = drop_twins_equal_to_the_model(runs, clis)
        check_checkpoints_outside_trained_runs(runs, clis)
        folder = report_folder(next(iter(clis.values())), name)
        check_not_a_fit_run(folder)
        for note in checkpoint_budget_notes(runs, {run_name: clis[run_name].config.trainer.as_dict()
                                                   for run_name in runs}):
            print(note)  # a checkpoint run is evaluated, not trained: its budget is its run folder's
    if next(iter(clis.values())).trainer.is_global_zero:  # `ddp` runs this function on every rank
        # an earlier compare's report describes the runs this one moves to stale/ as it reaches them: it goes first
        # (also for runs without run folders, which move nothing: kept from the smoke run's report)
        runs_stay = not any(logger_folder(cli.trainer.logger) for cli in clis.values())
        move_earlier_reports(folder, REPORT_FILES, "compare", runs_stay)
    rows: list[dict[str, Any]] = []
    explanation_rows: list[dict[str, Any]] = []
    explained_runs: list[ExplainedRun] = []
    notes: dict[str, list[str]] = {}  # the note under the explanation table -> the runs whose rows it describes
    directions: dict[str, bool | None] = {"train_samples_per_s": True, "infer_samples_per_s": True}
    for index, (run_name, run) in enumerate(runs.items(), 1):
        cli = clis[run_name]
        where = logger_folder(cli.trainer.logger) or folder / run_name  # no run folder under fast_dev_run
        print(f"\n=== compare run {index}/{len(runs)}: {run_name} ({where}) ===", flush=True)
        # a compare run again (or a fit) left a run in its folder: moved to <name>/stale/ first (`move_earlier_run`)
        move_earlier_run(cli.trainer, "compare", False, cli.config.as_dict(), run.get("checkpoint"))
        _set_rng_states(random_states[run_name])  # as right after it was built, whatever ran before it
        with counting(cli, "train") as trained:
            if run.get("checkpoint"):  # evaluate trained weights instead of training
                with configuration_phase():
                    # as the run's precision holds them (64-true: float64 weights were copied into float32 ones)
                    convert_for_precision(cli.model, cli.trainer)
                    load_system_weights(cli.model, run["checkpoint"], cli.datamodule)
                cli.datamodule.setup("validate")
            else:
                fit(cli)
        # the scoring validation and its explanations are TensorBoard run <run>/validate, as `train.py validate`'s:
        # on the fit's logger they were points after the fit's last validation in its own curves
        with scoring_logged_apart(cli.trainer, "validate"):
            with counting(cli, "val") as validated:
                metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
            directions |= metric_directions(cli.model, "val")
            report = explanation_on_rank_zero(cli, explain_settings) if explain else None
            if report is not None:  # every explainer the System knows, scored on the same validation samples
                explained, maps, images = report
                explanation_rows += [{"run": run_name, **row} for row in explained]
                notes.setdefault(explanation_note(explained), []).append(run_name)  # the System's rows say its note
                directions |= explanation_directions(explained)  # and its columns' directions (L2X: mean_rank, ...)
                if maps:  # no figure where the inputs are not images (vectors, tokens)
                    # with the class its maps explain: the true class, or the System's own (L2X: its black box's)
                    explained_runs.append(explained_run(run_name, cli.model, cli.datamodule, images, maps))
                    log_figure(cli.trainer.loggers, "explanations",  # at the step of the validation's val/* points
                               explanation_figure(explained_runs[-1:], cli.datamodule), logged_step(cli.trainer))
        rows.append({
            "run": run_name,
            "model": cli.model.hparams.get("model_name", type(cli.model).__name__),
            **{k.removeprefix("val/"): float(v) for k, v in sorted(metrics.items())  # full precision: the CSV
               if not k.startswith("val/loss")},  # keeps it, the markdown rounds for reading (`report.cell`)
            "train_samples_per_s": trained.samples_per_s(cli.trainer),  # its own batches' time (SampleCounter)
            "infer_samples_per_s": validated.samples_per_s(cli.trainer),
            "weights": (f"{run['checkpoint']}{checkpoint_progress(str(run['checkpoint']))}" if run.get("checkpoint")
                        else trained.last_weights(cli.trainer)),  # which weights the row scores
        })
    if not all(cli.trainer.is_global_zero for cli in clis.values()):  # `ddp` runs this function on every rank
        return rows
    if explained_runs:
        save_figure(explanation_figure(explained_runs, clis[explained_runs[0].name].datamodule),
                    folder / "explanations.png")
    tables = {"models": rows, **({"explanations": explanation_rows} if explanation_rows else {})}
    write_report(folder, tables, directions | EXPLANATION_DIRECTIONS)
    models_note = f"{THROUGHPUT_NOTE}\n\n{WEIGHTS_NOTE}"  # what the models table's timings and scores are of
    report_path = folder / "report.md"
    models, heading, explanations = report_path.read_text().partition("\n## explanations")  # under its table
    report_path.write_text(f"{models.rstrip()}\n\n{models_note}\n{heading}{explanations}")
    print(f"\n{models_note}", flush=True)
    if explanation_rows:  # what the explanation table's columns compare
        note = explanation_notes(notes)
        with open(folder / "report.md", "a") as report_file:
            report_file.write(f"\n{note}\n")
        print(f"\n{note}", flush=True)
    return rows


def explanation_on_rank_zero(cli: ZooCLI, settings: dict[str, Any]) -> tuple[list[dict], dict, Any] | None:
    """The run's `explanation_report` (its explainers scored on the validation samples), computed on global rank
    zero only, the one process that writes the report: under `ddp` every rank ran it in full (88 s a method instead
    of 34 s on two GPUs) for results the other ranks drop. The other ranks get None and wait at a barrier (a no-op
    without a process group) until rank zero is done, so they do not run ahead into the next run's fit.

    The report runs inside `zoo.distributed.rank_local`: its scores are torchmetrics Metrics (DeletionAUC,
    AttributionInMask, SensitivityMax, L2X's SelectionRecovery and AgreementAccuracy, ...), whose compute() gathers
    from every rank whenever a process group exists, and under `ddp` the group outlives `fit`. Rank zero's gather
    then met the other ranks' barrier (gloo "Connection closed by peer", or a hang); inside the block every metric
    computes over rank zero's samples alone, the rows a single process gives."""
    report = None
    if cli.trainer.is_global_zero:
        with rank_local():
            report = cli.model.explanation_report(cli.datamodule, settings)
    cli.trainer.strategy.barrier("compare_explanations")
    return report


@contextlib.contextmanager
def naming_the_run(run_name: str) -> Iterator[None]:
    """A configuration error raised inside, while a compare run is built and checked before any training, names the
    run; the parser, which prints its own error and exits, gets the run's name in a line after its message (with
    several runs of one config, "unknown argument 'drop_rat'" did not say whose arguments held it)."""
    try:
        yield
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            sys.stderr.write(f"(compare run {run_name!r}; no run has trained)\n")
        raise
    except Exception as error:
        if not is_configuration_error(error):
            raise
        raise mark(ValueError(f"compare run {run_name!r}: {error}")) from None


def report_folder(cli: ZooCLI, name: str) -> Path:
    """Where the report goes: <save_dir>/<name>, beside the runs (<save_dir>/<name>/<run>), the save_dir of the
    first run's logger (checkpoints/ unless --trainer.logger.init_args.save_dir moves it), as ablate's table."""
    save_dir = getattr(cli.trainer.logger, "save_dir", None)
    return Path(save_dir or "checkpoints") / name


def check_not_a_fit_run(folder: Path, command: str = "compare") -> None:
    """Refuse a report folder that is a `train.py fit` run's (its config.yaml is there): the compare (ablate) wrote
    its report and runs inside that run, silently, and the fit's next run moved the run with the report to stale/ and
    left the compare's runs behind, its results split in two places (configs/aog_rcnn's compare spec and fit
    config shared a name). A file of that name is refused too (its runs were built, then the first fit failed with
    NotADirectoryError)."""
    option = "--name <name>, or `name:` in its spec" if command == "compare" else "--name <name>"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{command}: {folder} is a file, not a folder; the {command} writes its report and runs in "
                         f"the folder <save_dir>/<name>. Give the {command} another name: {option}.")
    if (folder / "config.yaml").is_file():
        raise ValueError(f"{command}: {folder} is the run folder of a `train.py fit` (its config.yaml is there); the "
                         f"{command} would write its report and runs inside that run. Give the {command} another "
                         f"name: {option}.")


def explanation_notes(notes: dict[str, list[str]]) -> str:
    """What the report says under its explanation table, from each note (`zoo.explain.scores.explanation_note` of
    a run's rows: each family says what its columns mean and which class they explain) -> the runs it describes:
    the note alone where every run has the same, else each note after the runs it is for (a twin of another
    family, whose rows explain another class or score other columns)."""
    if len(notes) == 1:
        return next(iter(notes))
    return "\n\n".join(f"{'Run' if len(runs) == 1 else 'Runs'} {', '.join(runs)}: {note}"
                         for note, runs in notes.items())

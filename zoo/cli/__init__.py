"""The command line: `python train.py fit|validate|test|predict|compare|ablate ...`.

    python train.py fit --config configs/baselines/parts_world.yaml        # LightningCLI: fit/validate/test/predict
    python train.py compare --config configs/icnn/parts_world.yaml         # a family against its declared twins
    python train.py ablate --config configs/icnn/parts_world.yaml --grid model.init_args.loss.init_args.weight=[0,1]

Every run lives in checkpoints/<run>/ (the logger's name): TensorBoard events, config.yaml (the resolved
config), and checkpoints/ with last.ckpt and the best checkpoint by validation accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from zoo.cli.ablate import ABLATE_HELP, ablate
from zoo.cli.compare import COMPARE_HELP, compare, default_name
from zoo.checks import close_names
from zoo.cli.errors import command_line as _command_line
from zoo.cli.errors import mark
from zoo.cli.lightning import ZooCLI

HELP = """\
usage: train.py {fit,validate,test,predict,compare,ablate} [--config CONFIG] [options]

interpretable-zoo: interpretable-by-construction models against their opaque twins. Every run lives in
checkpoints/<run>/ (TensorBoard events, config.yaml, checkpoints/). `train.py <command> --help` lists its options.

commands:
  fit         train a config (LightningCLI); validate / test / predict likewise
                python train.py fit --config configs/icnn/parts_world.yaml --trainer.max_epochs=10
  validate    one evaluation epoch over the validation set
  test        one evaluation epoch over the test set
  predict     run inference on the predict set
  compare     a family config against every opaque twin its System declares, or a compare spec: same data, seed and
              budget for every run, one report (report.md/.csv, explanations.png) in checkpoints/<name>/
                python train.py compare --config configs/quickstart.yaml
                python train.py compare --config configs/icnn/parts_world.yaml --name my_icnn --trainer.max_epochs=3
  ablate      a grid of fits over config values, seeds averaged (<metric>_mean, <metric>_std); finished points
              with the same settings are reused
                python train.py ablate --config configs/icnn/parts_world.yaml --name icnn_lambda \\
                    --grid model.init_args.loss.init_args.weight=[0,1,10] --grid seed_everything=[0,1]
"""


COMMANDS = ("fit", "validate", "test", "predict", "compare", "ablate")
LIGHTNING_OPTIONS = ("--config", "--print_config", "--seed_everything", "--ckpt_path")  # undotted LightningCLI ones


def check_command(argv: list[str]) -> None:
    """A missing or mistyped command is said once with the commands (and the closest one), not as jsonargparse's
    choice error, which lists only LightningCLI's four."""
    if argv and argv[0] in COMMANDS:
        return
    if not argv or argv[0].startswith("-"):
        raise mark(ValueError(f"give a command first: {', '.join(COMMANDS)} (train.py --help shows examples)."))
    close = close_names(argv[0], COMMANDS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise mark(ValueError(f"unknown command {argv[0]!r}; {hint}Commands: {', '.join(COMMANDS)}."))


def check_own_options(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """compare and ablate pass what they do not know to every run's LightningCLI, whose options are dotted
    (`--trainer.max_epochs`) but for a few; an undotted option close to one of their own is a typo of it
    (`--no_explian`), said with the right name before any run starts."""
    own = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    for arg in extra:
        option = arg.split("=", 1)[0]
        if option.startswith("--") and "." not in option and option not in LIGHTNING_OPTIONS:
            close = close_names(option, own, n=1, cutoff=0.75)
            if close:
                raise mark(ValueError(f"{parser.prog}: unknown option {option!r}; did you mean {close[0]!r}?"))


def check_one_config(configs: list[str]) -> None:
    """compare takes one `--config` (a spec, or a family config it compares with its twins); argparse kept the last
    of several and dropped the others without a word, so a base config and a tweak of it compared the tweak alone."""
    if len(configs) > 1:
        raise mark(ValueError(f"compare takes one --config (a compare spec or a family config), got "
                              f"{len(configs)}: {', '.join(configs)}. Give the spec or config once and put fit "
                              f"options on the command line after it (e.g. --trainer.max_epochs=3), or list "
                              f"them under its runs' `args:` in a compare spec."))


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever `sys.stderr` is when a message comes, not the one it was built with: a
    handler built while stderr was redirected (pytest's capture, a notebook cell's) wrote to that closed stream ever
    after ("--- Logging error --- ValueError: I/O operation on closed file", with a traceback, in every later run)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ sets it: the property decides
        pass


def show_zoo_messages() -> None:
    """The zoo's INFO messages (e.g. the load report of a pretrained file) on stderr, as Lightning shows its own."""
    logger = logging.getLogger("zoo")
    if not logger.handlers:
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)


def main(args: list[str] | None = None) -> Any:
    """Run a command (`args` as on the command line; default sys.argv). From Python, errors are raised; train.py
    runs `command_line()`, which prints configuration errors once, without a traceback."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] in (["-h"], ["--help"]):
        print(HELP)
        return None
    check_command(argv)
    show_zoo_messages()
    if argv and argv[0] == "compare":
        parser = argparse.ArgumentParser(prog="train.py compare", epilog=COMPARE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", required=True, action="append",
                            help="compare spec YAML, a family config or a run's config.yaml (one)")
        parser.add_argument("--name", help="report folder under checkpoints/ (default: the spec's name, else "
                                           "<config folder>_<stem>_compare)")
        parser.add_argument("--explain_images", type=int, help="override explain.num_images of the spec")
        parser.add_argument("--no_explain", action="store_true", help="skip the explainers")
        known, extra = parser.parse_known_args(argv[1:])
        check_own_options(parser, extra)
        check_one_config(known.config)
        return compare(known.config[0], extra, explain_images=known.explain_images, explain=not known.no_explain,
                       name=known.name)
    if argv and argv[0] == "ablate":
        parser = argparse.ArgumentParser(prog="train.py ablate", epilog=ABLATE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", required=True, action="append",
                            help="a fit config; repeat to layer configs in order, as fit does")
        parser.add_argument("--grid", action="append", required=True, help="key=[v1,v2,...]; repeat for axes")
        parser.add_argument("--name", help="folder under checkpoints/ (default: <config folder>_<stem>_ablation)")
        known, extra = parser.parse_known_args(argv[1:])
        check_own_options(parser, extra)
        return ablate(known.config, known.grid, known.name or f"{default_name(known.config[0])}_ablation", extra)
    return ZooCLI(args=args)


def command_line(args: list[str] | None = None) -> Any:
    """train.py's entry: `main`, a configuration error (a mistyped option, a missing data folder, a spec that does
    not hold) printed once without a traceback, exit status 2."""
    return _command_line(main, args)

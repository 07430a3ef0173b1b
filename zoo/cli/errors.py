"""Configuration errors for people: printed once, without the parser's traceback, with a did-you-mean.

A mistake in a run's configuration (an option or YAML key that does not exist, a data folder that is not there, a
checkpoint of another model) surfaces in three places, each handled here:

- the parser (`ZooArgumentParser.error`): jsonargparse's message without its union-type noise ("Expected a <class
  'NoneType'>", "Given value type ..."), the closest accepted names (`difflib.get_close_matches`) and the config file
  that holds a mistyped key (for a class_path that names no class: the setting and the class meant), then a one-line
  tip instead of LightningCLI's usage (hundreds of lines); exit status 2;
- instantiation (`ZooCLI.instantiate_classes`): jsonargparse wraps the error a class raised in a ValueError of its
  own (the message twice, an 80-line traceback); `root_cause` gives back the class's own error;
- compare and ablate building their runs (`configuration_phase`).

Such errors are marked (`is_configuration_error`); `command_line()` (train.py) prints a marked error once, as
"train.py: error: <message>", and exits with status 2 (with JSONARGPARSE_DEBUG=true it raises, traceback and all;
jsonargparse itself takes only true/false there).
From Python (`zoo.cli.main([...])`) they are raised.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn

import yaml
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities.exceptions import SIGTERMException

from zoo.checks import close_names, keyword_arguments

MARK = "zoo_configuration_error"
NOISE = [re.compile(pattern) for pattern in (
    r"^\s*Does not validate against any of the Union subtypes\s*$", r"^\s*Subtypes: \[.*\]\s*$", r"^\s*Errors:\s*$",
    r"^\s*- Expected a <class 'NoneType'>\s*$", r"^\s*Given value type: .*$", r"^\s*Given value: .*$")]


def debug_requested() -> bool:
    """JSONARGPARSE_DEBUG set (jsonargparse's own switch): errors keep their traceback."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def mark(error: BaseException) -> BaseException:
    """`error` marked as a configuration error (printed without a traceback by `command_line`)."""
    setattr(error, MARK, True)
    return error


def is_configuration_error(error: BaseException) -> bool:
    """Marked, or by its kind the user's file wherever it is found: a data folder not in its layout (some are read
    only at setup, inside the fit) or a checkpoint that does not fit the run (Lightning loads it late)."""
    from datamodules._base import DataSettingError, DatasetLayoutError
    from zoo.weights import CheckpointError

    return bool(getattr(error, MARK, False)) or isinstance(error, (DatasetLayoutError, DataSettingError,
                                                                   CheckpointError))


def root_cause(error: BaseException) -> BaseException:
    """The first error of a chain of `raise ... from ...` (the one a class raised, under jsonargparse's wrappers),
    or the zoo's own error on the way down (a CheckpointError saying what to do, not the torch reader error it
    wraps)."""
    while error.__cause__ is not None and not is_configuration_error(error):
        error = error.__cause__
    return error


@contextlib.contextmanager
def configuration_phase() -> Iterator[None]:
    """Errors raised inside are configuration errors: their root cause is raised, marked."""
    try:
        yield
    except Exception as error:
        raise mark(root_cause(error)) from None


def config_files(args: list[str], cwd: Path | None = None) -> list[Path]:
    """The config files named on a command line (`--config x`, `--config=x`, `-c x`) that exist, relative paths read
    from `cwd` (the directory the command ran in: jsonargparse parses a config file from inside its folder, so the
    working directory may have moved by the time a key of it is refused). Each as named on the command line."""
    files = []
    for index, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            args[index + 1] if arg in ("--config", "-c") and index + 1 < len(args) else None)
        if value is not None and ((cwd or Path()) / value).is_file():
            files.append(Path(value))
    return files


def dotted_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a nested YAML mapping, dotted ("model.init_args.loss.init_args.weight")."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield f"{prefix}{key}"
            yield from dotted_keys(value, f"{prefix}{key}.")
    elif isinstance(config, list):
        for value in config:
            yield from dotted_keys(value, prefix)


def keys_in_files(key: str, args: list[str], cwd: Path | None = None) -> dict[Path, list[str]]:
    """The config files of `args` (relative to `cwd`) holding `key` (dotted; or as the last part of a longer dotted
    key), as named on the command line -> the full dotted keys it is in them."""
    found = {}
    for path in config_files(args, cwd):
        try:
            keys = set(dotted_keys(yaml.safe_load(((cwd or Path()) / path).read_text())))
        except yaml.YAMLError:
            continue
        matches = sorted(k for k in keys if k == key or k.endswith(f".{key}"))
        if matches:
            found[path] = matches
    return found


def files_with_key(key: str, args: list[str], cwd: Path | None = None) -> list[Path]:
    """The config files of `args` (relative to `cwd`) holding `key` (`keys_in_files`)."""
    return list(keys_in_files(key, args, cwd))


def init_parameters(class_path: str) -> list[str]:
    """The keyword arguments of the class a dotted path names (`zoo.checks.keyword_arguments`); none if it does not
    import."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return keyword_arguments(cls)


def nested_option(context: str, bad: str, args: list[str]) -> tuple[list[str], str] | None:
    """For a command-line option refused inside a class given by class_path, whose first dotted part is not one of
    the class's init arguments (`--model.init_args.los.init_args.weight=0`: "Problem with given class_path
    '...ICNNSystem': unrecognized arguments: --los.init_args.weight=0"): ([the full option meant], "") with the first
    part matched among the class's init arguments (`init_parameters`, as "Option 'los' is not accepted" is), or
    ([], "<Class> accepts ...") when none is close. `context` is the message before the refused option (its last
    class_path is the class); the option's prefix is the one `args` gave it (`model.init_args.`), else the parser keys
    of `context`. None outside a class_path, or when the first part is an init argument (the class's own message
    then says more than a guess)."""
    class_paths = re.findall(r"class_path '([^']+)'", context)
    parameters = init_parameters(class_paths[-1]) if class_paths else []
    first, dot, rest = bad.partition(".")
    if not parameters or first in parameters:
        return None
    close = difflib.get_close_matches(first, parameters, n=1, cutoff=0.6)
    if not close:
        return [], f"{class_paths[-1].rsplit('.', 1)[-1]} accepts {', '.join(parameters)}"
    given = [arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--")]  # option names as typed
    prefix = next((name.removesuffix(bad) for name in given if name.endswith(f".{bad}")), None)
    if prefix is None:  # e.g. the option came from elsewhere: rebuild it from the parser keys of the message
        prefix = "".join(f"{key}.init_args." for key in re.findall(r'Parser key "([^"]+)"', context))
    return [f"{prefix}{close[0]}{dot}{rest}"], ""


ALIASES = {"learning_rate": "lr", "learningrate": "lr", "lr_rate": "lr", "wd": "weight_decay",
           "weightdecay": "weight_decay", "weight_decay_rate": "weight_decay", "decay": "weight_decay",
           "beta": "betas", "epsilon": "eps"}  # other libraries' names (Keras, timm's flags) -> torch's
CLASS_MODULES = ("datamodules", "torch.optim", "torch.optim.lr_scheduler")  # with losses.<family>, zoo.<family>.system
NUMBER_GIVEN_AS_PATH = re.compile(r"Expected a <class '(float|int)'>\s*-\s*(?:Expected a dot import path string|"
                                  r"Unexpected import path format): (\S+)")  # (jsonargparse's union of a number)
CLASS_PATH_ERRORS = (re.compile(r"module '([\w.]+)' has no attribute '(\w+)'"),
                     re.compile(r"No module named '([\w.]+)'"),
                     re.compile(r"Expected a dot import path string: (\S+)"))


def close_name(bad: str, candidates: list[str]) -> list[str]:
    """The accepted name meant by `bad`: a known alias of it (`learning_rate` -> `lr`, `wd` -> `weight_decay`: too
    far apart for difflib), else the closest ignoring case (`zoo.checks.close_names`: `Adamw` is AdamW, not the
    closer Adam); [] when none is."""
    alias = ALIASES.get(bad.lower().replace("-", "_"))
    return [alias] if alias in candidates else close_names(bad, candidates, n=1, cutoff=0.6)


def public_classes(module_name: str) -> list[str]:
    """The public classes a module holds (its own and those it imports); none if it does not import."""
    import importlib
    import inspect

    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a module that fails to import offers no names
        return []
    return sorted(name for name, value in vars(module).items() if inspect.isclass(value) and not name.startswith("_"))


def class_modules() -> list[str]:
    """The modules a class_path of the zoo points into: the datamodules, each family's losses (`losses.<family>`)
    and System (`zoo.<family>.system`), torch's optimisers and schedulers."""
    import pkgutil

    import losses
    import zoo

    families = [f"losses.{m.name}" for m in pkgutil.iter_modules(losses.__path__)]
    systems = [f"zoo.{m.name}.system" for m in pkgutil.iter_modules(zoo.__path__)
               if m.ispkg and (Path(zoo.__path__[0]) / m.name / "system.py").is_file()]
    return [*CLASS_MODULES, *families, *systems]


def class_named(name: str) -> list[str]:
    """The full dotted path of the zoo's class meant by a bare or misplaced class name (`PartsWorldDatamodule` ->
    `datamodules.PartsWorldDataModule`, `Adamw` -> `torch.optim.AdamW`): the same name up to case, else the closest
    name, among the classes of `class_modules`; [] when none is close."""
    paths: dict[str, str] = {}  # class name -> full path (a class imported elsewhere keeps its first module)
    for module in class_modules():
        for cls in public_classes(module):
            paths.setdefault(cls, f"{module}.{cls}")
    return [paths[close] for close in close_name(name, list(paths))]


def submodule_meant(missing: str) -> list[str]:
    """For "No module named 'a.b.c'": the module meant, its first missing part matched among the submodules of the
    deepest package that imports (`pkgutil.iter_modules`: `zoo.icn` -> `zoo.icnn`), or among the zoo's top-level
    packages when no part imports (`datamodule` -> `datamodules`); [] when none is close."""
    import importlib
    import pkgutil

    parts = missing.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:depth])
        try:
            names = [m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__)]
        except (ImportError, AttributeError):  # not there, or a module that is not a package
            continue
        close = difflib.get_close_matches(parts[depth], names, n=1, cutoff=0.6)
        return [".".join([package, close[0], *parts[depth + 1:]])] if close else []
    roots = sorted({module.split(".")[0] for module in class_modules()})
    close = difflib.get_close_matches(parts[0], roots, n=1, cutoff=0.6)
    return [".".join([close[0], *parts[1:]])] if close else []


def given_path(message: str, prefix: str) -> str | None:
    """The class_path the message quotes (`class_path 'x'`, `class_path='x'`, `Got value: x`; the innermost first)
    that is `prefix` or starts with it (jsonargparse names only the part that failed to import); None when none is
    (the import error of a module the class imports, not of the path given)."""
    paths = re.findall(r"class_path[ =]'([^']+)'|Got value: ([\w.]+)", message)
    return next((p for pair in reversed(paths) for p in pair if p == prefix or p.startswith(f"{prefix}.")), None)


def class_path_suggestion(message: str) -> str:
    """ "did you mean ...?" for a class_path that names no class (a data, model, loss, optimiser or scheduler
    class): the setting (its parser keys, `model.init_args.loss.class_path`), the path given and the path meant.
    Three messages of jsonargparse: "module 'm' has no attribute 'C'" (the class matched among m's classes, else
    among the zoo's: `class_named`), "No module named 'm'" (`submodule_meant`) and "Expected a dot import path
    string: C" (a bare class name: `class_named`). "" for any other message, or for an import error of a module
    that is not the one given (a class whose own imports fail)."""
    number = NUMBER_GIVEN_AS_PATH.search(message)  # a number's option (Adam's `lr: float | Tensor`, a union
    keys = re.findall(r'Parser key "([^"]+)"', message[: number.start()]) if number else []  # jsonargparse also
    if keys:  # tries as a class): not a class_path
        return f"{'.init_args.'.join(keys)} expects a number ({number.group(1)}); got {number.group(2)!r}"
    found = [(pattern, match) for pattern in CLASS_PATH_ERRORS for match in [pattern.search(message)] if match]
    if not found:
        return ""
    pattern, match = found[0]
    keys = re.findall(r'Parser key "([^"]+)"', message[: match.start()])
    setting = ".init_args.".join(keys) + ".class_path" if keys else "class_path"
    missing = ".".join(match.groups()) if pattern is not CLASS_PATH_ERRORS[2] else ""  # the part that is not there
    given = given_path(message, missing) if missing else match.group(1)
    if given is None:
        return ""
    if pattern is CLASS_PATH_ERRORS[0] and given == missing:  # the module is there, the class is not
        module, name = match.groups()
        close = [f"{module}.{c}" for c in close_name(name, public_classes(module))] or class_named(name)
    elif missing:  # a module that is not there (`zoo.icn`, or the `datamodules.parts_wrld` of a longer path)
        close = [f"{module}{given.removeprefix(missing)}" for module in submodule_meant(missing)]
    else:
        close = class_named(given)
    meant = f"did you mean '{close[0]}'?" if close else (
        "no close name among the datamodules, losses, Systems, optimisers and schedulers; give a module's dotted path "
        "and a class name, as 'datamodules.PartsWorldDataModule'")
    return f"{setting} '{given}' names no class: {meant}"


def suggestion(message: str, parser: Any, args: list[str], cwd: Path | None = None) -> str:
    """ "did you mean ...?" for the option or key the message refuses, and the config file that holds it (`args`'
    relative paths read from `cwd`)."""
    option = re.search(r"Option '([^']+)' is not accepted", message)
    subcommand = re.search(r"(?:Subcommand '[^']+'|Group '[^']+') does not accept option '([^']+)'", message)
    unrecognized = re.search(r"unrecognized arguments: --([^\s=]+)", message)  # a command-line option's typo
    close: list[str] | None = None  # the suggestion, when a branch below finds it itself
    nested = nested_option(message[: unrecognized.start()], unrecognized.group(1), args) \
        if unrecognized and not (subcommand or option) else None  # inside a class given by class_path
    if option and "class_path '" in message[: option.start()]:  # an init argument of a class given by class_path
        bad = option.group(1)
        given = re.search(r"Got value: Namespace\(class_path='([^']+)'", message[option.end():])  # optimizer, ...
        class_path = given.group(1) if given else re.findall(r"class_path '([^']+)'", message[: option.start()])[-1]
        candidates = init_parameters(class_path)
        where = f"{class_path.rsplit('.', 1)[-1]} accepts {', '.join(candidates)}" if candidates else ""
    elif unrecognized and nested is not None:  # a nested option whose first part is not an init argument of the class
        bad, (close, where), candidates = unrecognized.group(1), nested, []
    elif subcommand or option or unrecognized:
        bad = (subcommand or option or unrecognized).group(1)
        candidates = [a.dest for a in getattr(parser, "_actions", []) if isinstance(getattr(a, "dest", None), str)]
        where = ""
    else:
        return class_path_suggestion(message)
    close = close_name(bad, candidates) if close is None else close
    if not close and "." in bad:  # a mistyped last part of a dotted key: match it among the same group's keys
        group, _, last = bad.rpartition(".")
        close = [f"{group}.{m}" for m in close_name(
            last, [c.removeprefix(f"{group}.") for c in candidates if c.startswith(f"{group}.")])]
    on_command_line = unrecognized and not (subcommand or option)
    dashes = "--" if on_command_line else ""
    lines = [f"did you mean '{dashes}{close[0]}'?" if close else (where and f"({where})")]
    found = keys_in_files(bad, args, cwd)
    if on_command_line:  # not a mistake in a file: the option a config file's key gives on the command line
        full = sorted({key for keys in found.values() for key in keys if key != bad})
        if full and not close:
            lines = [f"did you mean {' or '.join(repr(f'--{key}') for key in full[:3])}?"]
    elif found:
        lines.append(f"the key {bad!r} is in {', '.join(str(f) for f in found)}")
    return "\n".join(line for line in lines if line)


def unreadable_config(message: str, args: list[str], cwd: Path | None = None) -> str:
    """For YAML that does not parse ("Problems parsing config ... in "<unicode string>", line 1"), the config file
    of `args` it is in, with yaml's own line: with several --config files the message named none of them."""
    if "Problems parsing config" not in message:
        return ""
    for path in config_files(args, cwd):
        try:
            yaml.safe_load(((cwd or Path()) / path).read_text())
        except yaml.YAMLError as error:
            mark_ = getattr(error, "problem_mark", None)
            line = f", line {mark_.line + 1}, column {mark_.column + 1}" if mark_ is not None else ""
            return f"the YAML that does not parse is {str(path)!r}{line}"
        except OSError:
            continue
    return ""


def clean(message: str) -> str:
    """jsonargparse's message without the union-type noise lines."""
    return "\n".join(line for line in message.splitlines() if not any(p.match(line) for p in NOISE))


class ZooArgumentParser(LightningArgumentParser):
    """LightningArgumentParser with short errors (see the module docstring); `JSONARGPARSE_DEBUG=true` or
    `exit_on_error=False` keep jsonargparse's own behaviour. No abbreviated options: argparse would read the typo
    `--trainer.max_epoch` as `--trainer.max_epochs` on the command line, while the same key in a YAML file is an
    error with a did-you-mean; now both are."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        self.zoo_args = list(sys.argv[1:] if args is None else args)  # to find the config file of a mistyped key
        self.zoo_cwd = Path.cwd()  # where their relative paths start
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_requested():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        args, cwd = getattr(self, "zoo_args", sys.argv[1:]), getattr(self, "zoo_cwd", None)
        hint = suggestion(message, parser, args, cwd) or unreadable_config(message, args, cwd)
        sys.stderr.write(f"{prog}: error: {clean(message)}\n" + (f"{hint}\n" if hint else "")
                         + f"tip: {prog} --help lists every option\n")
        sys.exit(2)


def command_line(main: Any, args: list[str] | None = None) -> Any:
    """Run `main(args)`; a configuration error is printed once, without a traceback, and exits with status 2. A run
    stopped by SIGTERM (a scheduler's preemption, `docker stop`, `kill`) exits with 143 (128 + SIGTERM), as a shell
    reports a terminated program: Lightning stops the loops with a bare `SystemExit`, status 0, so a batch script
    or a scheduler took the stopped run for a finished one."""
    try:
        return main(args)
    except SIGTERMException:
        sys.stderr.write("train.py: stopped by SIGTERM; the same command with --ckpt_path last resumes a fit from its "
                         "last.ckpt, the same ablate command goes on from its finished points.\n")
        sys.exit(128 + signal.SIGTERM)
    except Exception as error:
        if not is_configuration_error(error) or debug_requested():
            raise
        sys.stderr.write(f"train.py: error: {worker_message(str(error))}\n(JSONARGPARSE_DEBUG=true shows the "
                         f"traceback)\n")
        sys.exit(2)


def worker_message(message: str) -> str:
    """The error's own message where a DataLoader worker raised it: torch builds the error again in the main process
    from "Caught <Error> in DataLoader worker process <i>." and the worker's whole traceback, which the one-line
    configuration error printed in full (an unreadable image, with num_workers > 0)."""
    caught = re.match(r"Caught (\w+) in DataLoader worker process (\d+)\.\nOriginal Traceback", message)
    if caught is None:
        return message
    last = re.search(rf"^(?:[\w.]+\.)?{caught.group(1)}: ", message, re.M)  # the traceback's last entry: the error
    return message[last.end():].rstrip("\n") if last else message

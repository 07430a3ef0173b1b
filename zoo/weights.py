"""Reading weights and checkpoints: safetensors or `torch.load(weights_only=True)`, wrapper prefixes
and key maps, and one error type (`CheckpointError`) that names the file and the keys.

Nothing here imports Lightning or the registry (the registry imports this module, and tells `check_same_model`
which models are sized by their input): a trained model built from a checkpoint is `zoo.checkpoints`'s job.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

EXPORT_WEIGHTS = "model.safetensors"  # the weight file of an export folder (`zoo.export_checkpoint`)

# Set while a model is built whose every weight a checkpoint is about to replace (`checkpoint_replaces_weights`).
_CHECKPOINT_REPLACES_WEIGHTS: ContextVar[bool] = ContextVar("checkpoint_replaces_weights", default=False)


class CheckpointError(ValueError):
    """A weight or checkpoint file that is missing, unreadable or does not fit the model it is loaded into."""


@contextmanager
def checkpoint_replaces_weights() -> Iterator[None]:
    """Build models whose every weight a checkpoint replaces next (`load_from_checkpoint`, `--ckpt_path FILE`,
    `--ckpt_path last` where a last checkpoint exists, compare's `checkpoint:`): a backbone's `pretrained_path` is
    not read, so the ImageNet file the run started from may have moved or gone (and a 500 MB file is not read for
    nothing). Its load report says so."""
    token = _CHECKPOINT_REPLACES_WEIGHTS.set(True)
    try:
        yield
    finally:
        _CHECKPOINT_REPLACES_WEIGHTS.reset(token)


def weights_will_be_replaced() -> bool:
    """Whether models are being built inside `checkpoint_replaces_weights`: a file that only gives starting weights
    (a pretrained backbone, a textual stage-1 checkpoint) need not be read."""
    return _CHECKPOINT_REPLACES_WEIGHTS.get()


# Where files wrap their state dict, in the order timm's `load_checkpoint` (use_ema=True, its default) takes them: an
# EMA copy first (timm train.py's "state_dict_ema", DeiT's "model_ema"), then the plain one (a Lightning checkpoint's
# "state_dict"; "model" in torchvision's reference scripts, DeiT and MAE).
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Globals `torch.load(weights_only=True)` may build beside the tensors: the `args` (argparse.Namespace) that training
# scripts save with their weights (torchvision's references, DeiT, MAE, timm train.py), as timm's load_checkpoint
# allows.
SAFE_GLOBALS = (argparse.Namespace,)
BATCH_COUNT = "num_batches_tracked"  # BatchNorm's step counter: absent from older and FrozenBatchNorm files


def _is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _refused_globals(path: Path, err: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused `path`, where the cause is objects it will not build: the globals
    named (torch's own list, or its error's "Unsupported global"), and whether they are a whole pickled model.
    "" where the error is something else (a truncated or foreign file)."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - an old torch or an unreadable file: the error's own text may still name one
        names = []
    names = sorted(n for n in names if n not in {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS})
    if not names:
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if not names:
        return ""

    def is_module(name: str) -> bool:  # looked up among the modules already imported: nothing of the file runs
        owner, _, attr = name.rpartition(".")
        cls = getattr(sys.modules.get(owner), attr, None)
        return isinstance(cls, type) and issubclass(cls, nn.Module)

    what = ("a whole pickled model (torch.save(model)); save its state_dict() instead"
            if any(is_module(n) for n in names) else "objects weights_only=True does not build, as they could run "
            "code; if you trust the file, save the state dict it holds on its own")
    return f"it pickles {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}: {what}"


def _weight_candidates(path: str | Path) -> list[tuple[dict[str, torch.Tensor], str | None]]:
    """The state dicts of a weight file with the key each is under, in `STATE_DICT_KEYS` order (EMA weights first);
    one (key None) where the file is a state dict itself (a safetensors file, an export folder's)."""
    path = Path(path)
    if path.is_dir():
        if not (path / EXPORT_WEIGHTS).is_file():
            raise CheckpointError(f"Weight path {str(path)!r} is a folder without {EXPORT_WEIGHTS} (what "
                                  f"zoo.export_checkpoint writes); name the weight file itself.")
        path = path / EXPORT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"Weight file {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return [(load_file(str(path)), None)]
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader error means the same thing to the user
        refused = _refused_globals(path, err)
        raise CheckpointError(
            f"Could not read weights from {str(path)!r} ("
            + (refused if refused else f"{type(err).__name__}: {err}") + "). Expected a .safetensors file, a state "
            "dict saved with torch.save, or a checkpoint holding one (a Lightning .ckpt, a training script's, "
            "args included); read with weights_only=True."
        ) from err
    if isinstance(obj, dict) and not _is_state_dict(obj):
        held = [(obj[k], k) for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))]
        if held:
            return held
    if not _is_state_dict(obj):
        keys = f" with keys {[str(k) for k in list(obj)[:8]]}{' ...' if len(obj) > 8 else ''}" \
            if isinstance(obj, dict) else ""
        raise CheckpointError(f"{str(path)!r} does not hold a state dict (name -> tensor), at its top level or under "
                              f"{list(STATE_DICT_KEYS)}; got {type(obj).__name__}{keys}.")
    return [(obj, None)]


def _say_choice(path: str | Path, held: list[tuple[dict[str, torch.Tensor], str | None]], key: str | None) -> None:
    """Log which of a file's several state dicts (`_weight_candidates`) is read, where it holds more than one."""
    if len(held) > 1:
        log.info("%r holds %s: reading %r (timm's load_checkpoint's choice, EMA weights first).", str(path),
                 " and ".join(repr(k) for _, k in held), key)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, a `torch.save`d state dict, the model.safetensors of an export folder
    (`zoo.export_checkpoint`), or a state dict a file wraps, found as timm's `load_checkpoint` finds it: the first of
    `STATE_DICT_KEYS` that holds one, EMA weights before plain ones (a file with both is logged, naming the key read).
    Always `weights_only=True`; the `args` (argparse.Namespace) of training scripts' checkpoints are allowed, as timm
    allows them, and any other object is refused naming it."""
    held = _weight_candidates(path)
    _say_choice(path, held, held[0][1])
    return held[0][0]


def _fill_batch_counts(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], missing: list[str]) -> list[str]:
    """Give `state` the module's own BatchNorm step counters (`num_batches_tracked`, zeros in a new module) that the
    file lacks, as torch's BatchNorm does for files saved before it had them (and timm loads them): files of
    FrozenBatchNorm2d (torchvision's detectors) and older or converted ImageNet files carry none. The counter only
    matters for momentum=None; every other missing key stays missing, and so does the counter of a BatchNorm the file
    holds nothing of (a stage it lacks is named whole). Returns the keys filled."""
    held = {k.rpartition(".")[0] for k in state}  # modules the file holds tensors of
    filled = [k for k in missing if k.rpartition(".")[2] == BATCH_COUNT and k.rpartition(".")[0] in held]
    for key in filled:
        state[key] = own[key].clone()
    return filled


def _mismatch(missing: list[str], bad_shapes: list[str]) -> str:
    """The missing keys and shape mismatches of a file that does not fit, only the parts that are not empty."""
    parts = [f"{len(missing)} missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "",
             f"shape mismatches {bad_shapes[:8]}{' ...' if len(bad_shapes) > 8 else ''}"
             if bad_shapes else ""]
    return "; ".join(p for p in parts if p)


def _canonical(key: str) -> str:
    """Name with separators unified: timm's features_only nets flatten "features.0" into "features_0"."""
    return key.replace(".", "_")


def _splits(key: str) -> Iterator[tuple[str, str]]:
    """(prefix, name) for the whole `key` and every tail of it that starts after a separator:
    "model.body.conv1.weight" -> ("", "model.body.conv1.weight"), ("model.", "body.conv1.weight"), ..."""
    yield "", key
    for i, char in enumerate(key[:-1]):
        if char in "._":
            yield key[: i + 1], key[i + 1 :]


@dataclass
class Match:
    """`source` keys renamed onto a module's keys: the tensors by target key (`state`), the target keys the source
    lacks (`missing`), the source keys left over (`unexpected`) and the prefix the matched ones shared (`prefix`:
    "" for a plain state dict, "model.backbone.body." for a zoo System checkpoint, ...)."""

    state: dict[str, torch.Tensor]
    missing: list[str]
    unexpected: list[str]
    prefix: str = ""


def match_state_dict(source: dict[str, torch.Tensor], target_keys: list[str], what: str = "the model") -> Match:
    """Rename `source` keys onto `target_keys`: the module sits under one prefix of the file (whatever wraps it: a
    Lightning System's "model.", DDP's "module.", AOG-RCNN's "model.backbone.body.body.", none), found as the prefix
    under which the most target keys are present (separators unified). Two prefixes that both hold every target key
    (BatchNorm step counters aside, `_fill_batch_counts`: two copies of the module) are ambiguous and raise."""
    by_canonical = {_canonical(k): k for k in target_keys}
    under: dict[str, dict[str, str]] = {}  # prefix -> {target key: source key}
    for key in source:
        for prefix, name in _splits(key):
            target = by_canonical.get(_canonical(name))
            if target is not None:
                under.setdefault(prefix, {}).setdefault(target, key)
    if not under:
        return Match({}, list(target_keys), list(source))
    most = max(len(found) for found in under.values())
    best = sorted((p for p, found in under.items() if len(found) == most), key=len)
    needed = sum(k.rpartition(".")[2] != BATCH_COUNT for k in target_keys)
    complete = [p for p in best if sum(k.rpartition(".")[2] != BATCH_COUNT for k in under[p]) == needed]
    if len(complete) > 1:
        raise CheckpointError(f"The file holds {what} {len(complete)} times, under {complete[:4]}; save the one you "
                              f"want as its own state dict.")
    prefix, found = best[0], under[best[0]]
    used = set(found.values())
    return Match({target: source[key] for target, key in found.items()}, [k for k in target_keys if k not in found],
                 [k for k in source if k not in used], prefix)


def load_module_weights(module: nn.Module, path: str | Path, prefix: str, what: str) -> None:
    """Weights for `module` from a state dict, safetensors file or Lightning checkpoint, whose keys carry `prefix`
    (e.g. "black_box." in an L2X checkpoint) or not (a plain state dict, a System's "model."-prefixed one);
    missing or mis-shaped weights raise CheckpointError naming `what` (BatchNorm step counters the file lacks start
    from the module's own, `_fill_batch_counts`)."""
    state = read_state_dict(path)
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    try:
        match = match_state_dict(own or state, list(module.state_dict()), f"the {what}")
    except CheckpointError as err:
        raise CheckpointError(f"{str(path)!r}: {err}") from None
    filled = _fill_batch_counts(match.state, module.state_dict(), match.missing)
    match.missing = [k for k in match.missing if k not in filled]
    if match.missing:
        raise CheckpointError(f"{str(path)!r} does not hold weights for the {what} ({type(module).__name__}): "
                              f"missing {match.missing[:8]}.")
    try:
        module.load_state_dict(match.state)
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r} does not fit the {what} ({type(module).__name__}): {err}") from err


@dataclass
class LoadReport:
    """What a pretrained file gave a model: the backbone tensors loaded (all of the backbone's, strictly), the file's
    tensors skipped (no place in the backbone, e.g. the ImageNet classifier), the model's tensors outside the
    backbone that start from their initialisation (new: the zoo's head, ICNN filters, ...), first convolutions
    adapted to another number of input channels (`adapted`), BatchNorm step counters the file lacks, kept at the
    module's own (`filled`, `_fill_batch_counts`), the key of the file the state dict was under (`key`: "state_dict",
    "state_dict_ema", ...; None for a bare state dict) and whether the file was read at all (`read`: not when a
    checkpoint replaces every weight, `checkpoint_replaces_weights`)."""

    path: str
    loaded: list[str]
    skipped: list[str]
    new: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    key: str | None = None
    read: bool = True

    def summary(self, shown: int = 12) -> str:
        if not self.read:
            return f"Pretrained weights {self.path!r}: not read; a checkpoint's weights replace every tensor."

        def names(keys: list[str]) -> str:
            return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")

        under = f" ({self.key!r})" if self.key else ""
        adapted = f"; adapted {len(self.adapted)} [{names(self.adapted)}]" if self.adapted else ""
        filled = (f"; {len(self.filled)} {BATCH_COUNT} not in the file, kept at the model's [{names(self.filled)}]"
                  if self.filled else "")
        return (f"Pretrained weights {self.path!r}{under}: loaded {len(self.loaded)} backbone tensors; skipped "
                f"{len(self.skipped)} [{names(self.skipped)}]; new {len(self.new)} [{names(self.new)}]{adapted}"
                f"{filled}.")


def _first_conv_channels(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(key, the file's input channels, the model's) where the file's first convolution differs from the model's in
    its input channels alone; None otherwise."""
    first = next((k for k, v in own.items() if v.ndim == 4), None)  # (O, I, kh, kw): the stem's kernel
    if first is None or first not in state:
        return None
    weight, wanted = state[first], own[first].shape
    if weight.ndim != 4 or weight.shape == wanted or weight.shape[:1] + weight.shape[2:] != wanted[:1] + wanted[2:]:
        return None
    return first, weight.shape[1], wanted[1]


def _adapt_first_conv(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Where only the input channels of the first convolution differ and the file's are RGB (3), adapt the file's
    kernel in `state` as timm adapts its RGB pretrained weights to a model's `in_chans` (`adapt_input_conv`: summed
    over the colours for grey images, repeated and rescaled for more channels); what was adapted, for the load
    report. A file of other than 3 channels is not adapted (timm's rule assumes RGB weights: it would sum a 2-channel
    file into a grey one, silently): it stays a shape mismatch, which `_first_conv_hint` explains."""
    from timm.models import adapt_input_conv

    found = _first_conv_channels(own, state)
    if found is None or found[1] != 3:
        return []
    first, held, wanted = found
    try:
        adapted = adapt_input_conv(wanted, state[first])  # timm's rule: pretrained files are RGB (base_chans=3)
    except (NotImplementedError, AssertionError, ValueError):
        return []
    if adapted.shape != own[first].shape:
        return []
    state[first] = adapted
    return [f"{first}: {held} -> {wanted} input channels (timm adapt_input_conv)"]


def _first_conv_hint(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """What to do where the first convolution still differs in its input channels alone (a file that was not RGB,
    `_adapt_first_conv`): build the model for the file's channels. "" where that is not the mismatch."""
    found = _first_conv_channels(own, state)
    if found is None:
        return ""
    _, held, wanted = found
    return (f"; the file's first convolution takes {held} input channels where this model's takes {wanted}: create "
            f"the model with the in_chans of the images the file was trained on (in_chans={held} for a plain stem; "
            f"only RGB files are adapted to another channel count)")


def load_backbone_weights(body: nn.Module, path: str | Path, what: str,
                          full_keys: Callable[[], Iterable[str]] | None = None,
                          identify: Callable[[dict[str, torch.Size]], str | None] | None = None) -> LoadReport:
    """Every tensor of `body` from a weight file, strictly: missing or mis-shaped tensors raise CheckpointError
    naming them. An RGB first convolution whose kernel differs only in its input channels is adapted (timm's
    `adapt_input_conv`, e.g. ImageNet weights for grey images; a file of other channels raises, naming the
    `in_chans` it needs) and reported, as are BatchNorm step counters the file lacks (kept at the module's own,
    `_fill_batch_counts`: torchvision's detector files, older ImageNet ones).

    The file's other tensors are skipped (and listed in the report) where they have a place in the whole
    architecture the backbone is cut from, `full_keys()` (the ImageNet classifier, stages after a truncated
    backbone's last), or lie outside the part of the file that holds the backbone (a zoo checkpoint's head and
    filters); any other one means the file is another network (resnet34 weights for a resnet18) and raises, naming
    them and what `identify(<the file's tensors under the backbone's prefix, by name>)` says they come from.
    A file holding several state dicts (an EMA copy and the plain one) gives the first that fits, in
    `STATE_DICT_KEYS` order (EMA first, as timm), and says so where an earlier one did not fit; where none fits, the
    first one's error, naming its key. Inside `checkpoint_replaces_weights()` nothing is read.
    """
    if weights_will_be_replaced():
        return LoadReport(str(path), [], [], read=False)
    held = _weight_candidates(path)
    errors: list[CheckpointError] = []
    for source, key in held:
        try:
            report = _load_backbone_state(body, source, key, path, what, full_keys, identify)
        except CheckpointError as err:
            errors.append(err)
            continue
        if errors:
            log.info("%r: %r does not fit %s (%s); read %r.", str(path), held[0][1], what, errors[0], key)
        else:
            _say_choice(path, held, key)
        return report
    raise errors[0]


def _load_backbone_state(body: nn.Module, source: dict[str, torch.Tensor], key: str | None, path: str | Path,
                         what: str, full_keys: Callable[[], Iterable[str]] | None,
                         identify: Callable[[dict[str, torch.Size]], str | None] | None) -> LoadReport:
    """`load_backbone_weights` of one state dict of the file (`source`, under `key`)."""
    own = body.state_dict()
    where = f"{str(path)!r}" + (f" (under {key!r})" if key else "")
    try:
        match = match_state_dict(source, list(own), what)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    state = match.state
    filled = _fill_batch_counts(state, own, match.missing)
    missing = [k for k in match.missing if k not in filled]
    adapted = _adapt_first_conv(own, state)
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if v.shape != own[k].shape]
    if missing or bad_shapes:
        raise CheckpointError(
            f"{where} does not fit {what}: {_mismatch(missing, bad_shapes)}"
            + (f" (its other tensors found under {match.prefix!r})" if match.prefix and state else "")
            + _first_conv_hint(own, state) + "."
        )
    inside = [k for k in match.unexpected if k.startswith(match.prefix)]  # where the file holds the backbone
    known = {_canonical(k) for k in (full_keys() if full_keys is not None and inside else ())}
    foreign = [k for k in inside if _canonical(k[len(match.prefix) :]) not in known]
    if foreign:
        shapes = {k[len(match.prefix) :]: v.shape for k, v in source.items() if k.startswith(match.prefix)}
        origin = identify(shapes) if identify is not None else None
        raise CheckpointError(
            f"{where} does not fit {what}: it holds {len(foreign)} tensors the architecture has no place for "
            f"{foreign[:8]}{' ...' if len(foreign) > 8 else ''}"
            + (f"; they look like {origin} weights" if origin else "")
            + ". Give the backbone the file was saved from, or a file of this one."
        )
    body.load_state_dict(state)  # strict: every key of `body` is in `state`
    return LoadReport(str(path), [k for k in state if k not in filled], match.unexpected, adapted=adapted,
                      filled=filled, key=key)


def log_load_reports(model: nn.Module) -> None:
    """Complete the load report of every pretrained backbone in `model` with the model's tensors outside that
    backbone (new), and log it: what fine-tuning starts from, in one line."""
    keys = list(model.state_dict())
    for name, module in model.named_modules():
        report = getattr(module, "load_report", None)
        if isinstance(report, LoadReport):
            report.new = [k for k in keys if not k.startswith(f"{name}.")] if name and report.read else []
            log.info(report.summary())


MODEL_KEYS = ("model_name", "num_classes", "in_chans", "image_size", "data_inputs", "model_kwargs")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict (weights_only=True); a clear CheckpointError if it is not one."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"Checkpoint {str(path)!r} is a folder; name the .ckpt file in it (a run's are in "
                              f"<run>/checkpoints/: last.ckpt and the best).")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader error means the same thing to the user
        refused = _refused_globals(path, err)  # torch's own text advises weights_only=False: not passed on
        raise CheckpointError(f"Could not read checkpoint {str(path)!r}: {refused}." if refused else
                              f"Could not read checkpoint {str(path)!r} ({type(err).__name__}: {err}); pickled "
                              f"objects are refused (weights_only=True).") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint of a zoo System (no state_dict / "
                              f"hyper_parameters).")
    return checkpoint


def model_spec(hparams: dict[str, Any]) -> dict[str, Any]:
    """What builds the model of a System: its registry name and constructor inputs."""
    if "model_name" not in hparams:
        raise CheckpointError(f"The checkpoint's hyper_parameters name no model_name: {sorted(hparams)}.")
    return {key: hparams.get(key) for key in MODEL_KEYS}


def describe(spec: dict[str, Any]) -> str:
    return f"{spec['model_name']} with {spec.get('num_classes')} classes"


def _same_size(a: Any, b: Any) -> bool:
    """Two image sizes equal, however written: 64, [64, 64] and (64, 64) are one size."""
    def pair(size: Any) -> Any:
        return [size, size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else size
    return pair(a) == pair(b)


MISMATCH_HINTS = {
    "num_classes": " To fine-tune its weights to other classes, start a new run from them instead: "
                   "--model.init_args.model_kwargs.pretrained_path=<the checkpoint> (the backbone loads, the head is "
                   "new).",
    "image_size": " The model is built for the image size it was trained on: give the data that image_size.",
}
# The `source`s of `check_same_model` that a command reaches (`--ckpt_path ...`, a System loading a checkpoint under
# Lightning): their MISMATCH_HINTS name command-line options
COMMAND_LINE_SOURCES = ("--", "the checkpoint")
# The same hints for a Python caller (`zoo.load_checkpoint(path, num_classes=...)`: "checkpoint '<path>'"), which has
# no command-line option to give; {model_name} and {asked} are the checkpoint's model and the value asked for
PYTHON_MISMATCH_HINTS = {
    "num_classes": " To fine-tune its weights to other classes, build a new model from them instead: "
                   "zoo.create_model({model_name!r}, num_classes={asked!r}, pretrained_path=<the checkpoint>) (the "
                   "backbone loads, the head is new).",
    "image_size": " The model is built for the image size it was trained on: ask for that image_size.",
}


def built_in_chans(spec: dict[str, Any]) -> Any:
    """The channel count a model spec (`MODEL_KEYS`, or some of them) builds its model for, resolved as
    `zoo.registry.create_model_for_data` resolves it: `in_chans` (the data's channels for images), under
    `data_inputs["in_chans"]` (a series' channels: its datamodule's num_channels is None), under
    `model_kwargs["in_chans"]` (the user's, which win). None where none of them names it."""
    chans = spec.get("in_chans")
    for inputs in (spec.get("data_inputs"), spec.get("model_kwargs")):
        if isinstance(inputs, dict) and "in_chans" in inputs:
            chans = inputs["in_chans"]
    return chans


def _spec_value(spec: dict[str, Any], key: str) -> Any:
    """`spec[key]` as the model is built with it (the channel count however it is given: `built_in_chans`)."""
    return built_in_chans(spec) if key == "in_chans" else spec.get(key)


def check_same_model(checkpoint_spec: dict[str, Any], wanted: dict[str, Any], source: str,
                     sized_by_image: bool = False) -> None:
    """Raise naming the difference when a checkpoint holds another model, class count or channel count than the one
    asked for, or, for a model sized by its input (`sized_by_image`: ICNN's templates, sized for its top map; the
    registry's `check_same_model` says which), another `image_size` (where `wanted` says). Channel counts are
    compared as each model is built for them (`built_in_chans`), so a series' (given in `data_inputs`) is checked.
    The hint names a command-line option for a `source` a command reaches (`COMMAND_LINE_SOURCES`), a Python call
    for the others (`zoo.load_checkpoint`)."""
    sized = sized_by_image and checkpoint_spec.get("image_size") is not None
    for key in ("model_name", "num_classes", "in_chans") + (("image_size",) if sized else ()):
        held, asked = _spec_value(checkpoint_spec, key), _spec_value(wanted, key)
        if asked is not None and not (_same_size(held, asked) if key == "image_size" else held == asked):
            hints = MISMATCH_HINTS if source.startswith(COMMAND_LINE_SOURCES) else PYTHON_MISMATCH_HINTS
            raise CheckpointError(f"{source} holds {describe(checkpoint_spec)} ({key}={held!r}); this run builds "
                                  f"{describe({**checkpoint_spec, **wanted})} ({key}={asked!r})."
                                  + hints.get(key, "").format(model_name=checkpoint_spec.get("model_name"),
                                                              asked=asked))


# Datamodule settings that decide what a model sees of the same samples (its normalisation, size, resizing, crop,
# tokens), compared with those a checkpoint was trained with where both name them (`check_data_fits_checkpoint`);
# not where the samples come from (root, split sizes, seeds) nor how they are batched.
INPUT_SETTINGS = ("mean", "std", "image_size", "canvas_size", "upsample_mode", "crop_to_box", "crop_to_object",
                  "max_len", "max_vocab")
NO_NORMALISATION = {"mean": [0.0], "std": [1.0]}  # what mean / std None mean: [0, 1] pixels as they are


def resolved_normalization(data: dict[str, Any], backbone: str | None, channels: int | None) -> dict[str, Any]:
    """A checkpoint's datamodule settings with `mean: pretrained` resolved as its training resolved it (`backbone`'s
    pretrained mean and std for `channels`), so that the same normalisation written as lists is not taken for
    another; mean and std left out where that cannot be told (no backbone, or one without a timm pretrained
    config). What `--ckpt_path`'s data check and a textual stage-2 run's both compare."""
    from datamodules._base import PRETRAINED, pretrained_normalization

    if data.get("mean") != PRETRAINED:
        return dict(data)
    data = {k: v for k, v in data.items() if k not in ("mean", "std")}
    if backbone is not None:
        try:
            data["mean"], data["std"] = pretrained_normalization(backbone, channels)
        except ValueError:  # a backbone without a timm pretrained config
            pass
    return data


def _same_setting(key: str, held: Any, given: Any) -> bool:
    """Two values of the input setting `key` equal, however written: lists and tuples, ints and floats, one value or
    one per channel for a mean / std, None or the identity for a mean / std (`NO_NORMALISATION`)."""
    if key in NO_NORMALISATION:
        held, given = (NO_NORMALISATION[key] if v is None else v for v in (held, given))
    if isinstance(held, (list, tuple)) and isinstance(given, (list, tuple)):
        if len(held) != len(given) and min(len(held), len(given)) == 1:  # one value for every channel
            held, given = (list(v) * max(len(held), len(given)) if len(v) == 1 else v for v in (held, given))
        return len(held) == len(given) and all(_same_setting(key, a, b) for a, b in zip(held, given))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (held, given)):
        return math.isclose(held, given, rel_tol=1e-6, abs_tol=1e-9)
    return held == given


def check_data_fits_checkpoint(held: dict[str, Any], given: dict[str, Any], source: str, hint: str) -> None:
    """Refuse evaluating or predicting with data that feeds the model other inputs than it was trained on: an
    `INPUT_SETTINGS` value both the checkpoint's datamodule (`held`) and this run's (`given`) name, and that differs
    (else images normalised or sized otherwise would silently give wrong predictions). `hint` says what to run."""
    for key in INPUT_SETTINGS:
        if key in held and key in given and not _same_setting(key, held[key], given[key]):
            raise CheckpointError(f"{source} was trained on data with {key}={_shown(held[key])}; this run's data has "
                                  f"{key}={_shown(given[key])}, so the model would see other inputs than it learnt "
                                  f"from. {hint}")


# Datamodule settings a resumed fit may change: where the files are (a dataset folder that moved), how batches are
# loaded and what the test split is (its size, folder or VOC split: the train and val samples do not depend on them,
# each world draws its splits apart; not `test_fraction`, which is carved out of the training pool); every other one
# decides which samples the rest of the run trains and validates on, in which batches
DATA_RESUME_FREE = ("root", "path", "sentences_root", "num_workers", "pin_memory", "num_test", "test_dir",
                    "test_split")


def check_data_fit_resumes(held: dict[str, Any], given: dict[str, Any], source: str, hint: str) -> None:
    """Refuse a fit resumed with other data settings than its run was trained with (another batch size, split size,
    data seed, world): Lightning restores the epoch and the batch position inside it, which then index other
    batches of other samples, and the rest of the run mixes the two datasets, silently. Settings both the checkpoint's
    datamodule (`held`) and this run's (`given`) name are compared, but `DATA_RESUME_FREE` ones (the files' place,
    loading, the test split)."""
    changed = [key for key in held if key in given and key not in DATA_RESUME_FREE and
               not _same_setting(key, held[key], given[key])]
    if changed:
        lines = "; ".join(f"{key}: {_shown(held[key])} in the checkpoint, {_shown(given[key])} here"
                          for key in changed[:6])
        more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise CheckpointError(f"{source}: a resumed fit goes on with the data its run was trained on, and this run's "
                              f"data settings differ ({lines}{more}); the run would go on at its batch position in "
                              f"other batches of other samples. {hint} Or start a new run without --ckpt_path "
                              f"(the data's {', '.join(DATA_RESUME_FREE)} may change on resume).")


def check_class_names(held: list[str] | None, given: list[str] | None, source: str, hint: str,
                      renumbered: bool = False) -> None:
    """Refuse data whose class names (in class-id order) are not those a checkpoint was trained with: its class ids
    would be read as other classes (labels scored and predictions named wrongly). Skipped where either is unknown or
    the counts differ (`check_same_model` names another class count).

    With `renumbered` (the data is CUB's: `CUB200DataModule`), also accepted: a checkpoint whose names are exactly
    "0".."C-1" for data named "1".."C". Before 11d9450 a CUB folder without classes.txt named its classes by the
    0-based label ("0" was CUB class id 1); it now names them by their 1-based class id. The labels, and so the class
    ids a checkpoint learnt, did not change: those are the same classes under the old numbering. For any other data
    (an ImageFolder of folders 0, 1, 2 against one of 1, 2, 3: other classes) and any other difference, refused."""
    if held is None or given is None or len(held) != len(given) or list(held) == list(given):
        return
    held, given = [str(n) for n in held], [str(n) for n in given]
    if renumbered and held == [str(i) for i in range(len(held))] and given == [str(i + 1) for i in range(len(given))]:
        return  # the old 0-based names of the same classes (CUB without classes.txt, before 11d9450)
    order = " (the same names in another order: class ids would mean other classes)" if sorted(held) == \
        sorted(given) else ""
    if len(held) > 8:  # show where they differ, not 200 names
        ids = [i for i, (a, b) in enumerate(zip(held, given)) if a != b]
        shown = ", ".join(f"id {i}: {held[i]!r} vs {given[i]!r}" for i in ids[:3]) + (" ..." if len(ids) > 3 else "")
        raise CheckpointError(f"{source} was trained on other class names than this run's data has ({len(ids)} of "
                              f"{len(held)} differ: {shown}){order}. {hint}")
    raise CheckpointError(f"{source} was trained on classes {held}; this run's data has {given}{order}. {hint}")


def _shown(value: Any) -> str:
    """A setting as a config writes it: lists of floats to 4 significant digits."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


IDENTITY_KEYS = ("model_name", "variant")  # what names the model a System builds (classifiers; textual variants)


def check_config_fits_checkpoint(model_config: Any, checkpoint: dict[str, Any], source: str,
                                 resuming: bool = False, hint: str | None = None) -> None:
    """Refuse a checkpoint of another System class or model than a parsed CLI model config (a jsonargparse
    Namespace with class_path / init_args) builds, naming both; before anything is built or trained. `resuming`
    (fit): also one trained with other values of the System's `RESUME_KEYS` (test and predict take the
    checkpoint's, as Lightning copies its hyperparameters over the config). `hint` says what to run instead (the
    checkpoint's run config, where known); by default: resume with the run's own config or start afresh (fit), or
    evaluate with the checkpoint's own run config (validate / test / predict, which without --ckpt_path would run
    random weights)."""
    saved = checkpoint.get("hyper_parameters") or {}
    if model_config is None or not hasattr(model_config, "get"):
        return
    init_args = model_config.get("init_args") or {}
    wanted = {"class": model_config.get("class_path"), **{k: init_args.get(k) for k in IDENTITY_KEYS}}
    held = {"class": saved.get("_class_path"), **{k: saved.get(k) for k in IDENTITY_KEYS}}
    if wanted["variant"] is not None:  # a variant System builds its model from the variant, whatever model_name says
        wanted["model_name"] = held["model_name"] = None
    for key in wanted:
        if wanted[key] is not None and held[key] is not None and wanted[key] != held[key]:
            def name(values: dict[str, Any]) -> str:
                return " ".join(str(values[k]) for k in IDENTITY_KEYS if values[k] is not None) or str(values["class"])
            todo = hint or ("Resume a run with its own config, or start this one without --ckpt_path." if resuming
                            else "Validate, test or predict a checkpoint with its own run's config: --config "
                                 "<the run folder>/config.yaml.")
            raise CheckpointError(f"{source} holds {name(held)} ({key}={held[key]!r}); this config builds "
                                  f"{name(wanted)} ({key}={wanted[key]!r}). {todo}")
    if resuming and wanted["class"] is not None:
        check_resume_keys(resolve_class(wanted["class"]), saved, init_args, source)


def load_system_weights(system: nn.Module, path: str | Path, datamodule: Any = None) -> None:
    """A System checkpoint's weights into `system`: the System's own compatibility check first (its
    `on_load_checkpoint`, which names another model or class count), then every key must match. `datamodule`: given
    the state the checkpoint saved of its class, as Lightning restores it for a `ckpt_path` (a text datamodule's
    vocabulary, so the model's token ids keep their words)."""
    checkpoint = read_checkpoint(path)
    if hasattr(system, "on_load_checkpoint"):
        system.on_load_checkpoint(checkpoint)
    missing, unexpected = system.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not fit {type(system).__name__}: missing {list(missing)[:8]}, "
                              f"unexpected {list(unexpected)[:8]}.")
    if datamodule is not None:
        restore_datamodule_state(datamodule, checkpoint)


def restore_datamodule_state(datamodule: Any, checkpoint: dict[str, Any]) -> None:
    """The state a checkpoint saved of `datamodule`'s class into it, as Lightning's
    `_CheckpointConnector.restore_datamodule` restores it (its key and call); a checkpoint written before that class
    saved a state (none under its key) gets the datamodule's `load_missing_state()` where it has one (a text
    datamodule then reads the texts as they were read then), which Lightning has no call for."""
    state = checkpoint.get(type(datamodule).__qualname__)
    if state:
        datamodule.load_state_dict(state)
    elif hasattr(datamodule, "load_missing_state"):
        datamodule.load_missing_state()


def check_resume_keys(system: type, saved: dict[str, Any], wanted: Any, source: str) -> None:
    """Refuse, naming both values, a checkpoint whose `system.RESUME_KEYS` hyperparameters differ from `wanted`'s
    (a mapping; a key the checkpoint does not hold is not checked: checkpoints written before it existed)."""
    for key in getattr(system, "RESUME_KEYS", ()):
        if key in saved and key in wanted and saved[key] != wanted[key]:
            raise CheckpointError(f"{source} was trained with {key}={saved[key]!r}; this run has {key}="
                                  f"{wanted[key]!r}. Resume, validate, test or predict a checkpoint with its own "
                                  f"run's config (<the run folder>/config.yaml); to train with {key}="
                                  f"{wanted[key]!r}, start a new fit without --ckpt_path.")


SETTINGS_KEY = "zoo_model_settings"  # a checkpoint's model settings (`model_settings`), written by a CLI fit
RESUME_FREE = ("compile", "nonfinite_loss", "pretrained_path")  # a resumed fit may change these (and `*_checkpoint`)
# The System arguments the CLI links from the datamodule (data attribute -> System argument): a config's value for
# them is the argument's default, which the data replaces, so the model settings do not compare them (the data
# check does: `check_data_fits_checkpoint`, `check_same_model`, `check_class_names`)
DATA_LINKS = {"num_classes": "num_classes", "num_channels": "in_chans", "image_size": "image_size",
              "model_inputs": "data_inputs", "class_names": "class_names"}


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {dotted key: value} (lists kept whole)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out |= flat_settings(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_settings(model_config: Any) -> dict[str, Any] | None:
    """The model part of a run's parsed config (a jsonargparse Namespace: the System's class and init arguments,
    its loss, optimiser and scheduler with theirs) as {"model.<dotted key>": plain value}: what a checkpoint keeps
    (`SETTINGS_KEY`) so that a resumed fit can be held to it. The loss, optimiser and scheduler are not System
    hyperparameters, so the checkpoint's hyper_parameters alone cannot tell another learning rate or loss weight."""
    import json

    if model_config is None or not hasattr(model_config, "as_dict"):
        return None
    return json.loads(json.dumps(flat_settings(model_config.as_dict(), "model."), default=str))


def resume_free(key: str) -> bool:
    """Whether a resumed fit may change model setting `key` (dotted): torch.compile, the non-finite-loss policy (to
    skip the batch a run died on) and the files that only give starting weights or helpers (`pretrained_path`,
    `*_checkpoint`), which a resumed fit takes from its checkpoint instead (they may have moved)."""
    last = key.rsplit(".", 1)[-1]
    return last in RESUME_FREE or last.endswith("_checkpoint")


def _settles(key: str, settings: dict[str, Any]) -> bool:
    """Whether flat `settings`, which lack `key`, hold a value for it otherwise: a parent key with a leaf value (a
    scheduler None on one side, its class_path on the other), keys below it, or the mapping it is an entry of where
    that is a free-form `*_kwargs` (an entry given on one side only sets what the other leaves at the model's
    default: `model_kwargs.mu: centroid`). Any other key they know nothing of (a setting added to or removed from a
    System since one of the two runs) says nothing: its default is not known here."""
    parts = key.split(".")
    parents = [".".join(parts[:i]) for i in range(1, len(parts))]
    kwargs = [parent for parent in parents if parent.endswith("_kwargs")]
    return (any(parent in settings for parent in parents)
            or any(other.startswith(key + ".") for other in settings)
            or any(other.startswith(parent + ".") for parent in kwargs for other in settings))


def _empty_kwargs(key: str, settings: dict[str, Any]) -> bool:
    """Whether flat `settings` give the `*_kwargs` mapping `key` no entry: None, {} or no value (its entries, where
    it has any, are keys of their own): `model_kwargs: null` and an entry at the model's default on the other side
    build the same model, so the mapping itself is not a difference; its entries are compared one by one."""
    return key.endswith("_kwargs") and settings.get(key) in (None, {})


def check_settings_fit_checkpoint(held: dict[str, Any] | None, given: dict[str, Any] | None, source: str,
                                  hint: str, defaulted: dict[str, dict[str, Any]] | None = None) -> None:
    """Refuse a resumed fit whose model settings (`model_settings`: the System's init arguments, loss, optimiser,
    scheduler) differ from those its checkpoint was trained with, naming each key and both values: Lightning puts
    the checkpoint's hyperparameters over the config where `--ckpt_path` names a file (not for `last`) and the
    optimiser's own state over its learning rate, so a changed setting would be ignored or mixed with the old ones,
    silently. `resume_free` keys may change, and a key only one side knows of (`_settles`); the arguments the data
    sets (`DATA_LINKS`) are the data check's: a config holds their defaults, and a changed default (ReNN's `in_chans`)
    refused a run resumed with its own config. A checkpoint written before checkpoints kept their settings is not
    checked. `defaulted` ({"held" / "given": {key: value}}) names the values filled in with the model's default
    where that side did not set the key (`zoo.cli.lightning.with_model_defaults`): said as such, not as set."""
    if held is None or given is None:
        return
    linked = {f"model.init_args.{argument}" for argument in DATA_LINKS.values()}
    changed = [key for key in dict.fromkeys([*held, *given]) if key not in linked and not resume_free(key) and not (
        _empty_kwargs(key, held) and _empty_kwargs(key, given)) and (
        held[key] != given[key] if key in held and key in given else _settles(key, held if key in given else given))]
    if not changed:
        return
    defaulted = defaulted or {}

    def shown(settings: dict[str, Any], key: str) -> str:
        side = "held" if settings is held else "given"
        if key in defaulted.get(side, {}):
            return f"not set (the model's default now: {_shown(settings[key])})"
        return _shown(settings[key]) if key in settings else "(not set)"

    lines = "; ".join(f"{key}: {shown(held, key)} in the checkpoint, {shown(given, key)} here" for key in changed[:6])
    more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise CheckpointError(f"{source}: a resumed fit goes on with the model settings its run was trained with, and "
                          f"this run's differ ({lines}{more}); Lightning would ignore some (the optimiser's state "
                          f"keeps its learning rate) and use others mid-run. {hint} Or start a new run without "
                          "--ckpt_path.")


def resolve_class(class_path: str) -> Any:
    """The class a dotted path names (None where it does not import): two spellings of one class are one class."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except (ImportError, ValueError):
        return None

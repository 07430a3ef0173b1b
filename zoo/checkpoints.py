"""A trained model from a file: load it from a System checkpoint with `load_checkpoint`, export it as safetensors +
config.json with `export_checkpoint`, and load that back with `load_exported`. Above the registry (it builds models
by name) and `zoo.weights` (it reads the files); nothing here imports Lightning."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from zoo.checks import close_names
from zoo.registry import create_model_for_data
from zoo.weights import CheckpointError, check_same_model, model_spec, read_checkpoint


EXPECTABLE = ("model_name", "num_classes", "in_chans")  # what `load_checkpoint` can check against a checkpoint


def _build(spec: dict[str, Any]) -> nn.Module:
    return create_model_for_data(spec["model_name"], spec["num_classes"], spec.get("in_chans"),
                                 spec.get("image_size"), spec.get("data_inputs"), spec.get("model_kwargs"))


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {err}") from err
    return model.eval()


def _with_class_names(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """`model.class_names`: the names of its class ids as the data gave them ("0", "1", ... where none were saved)."""
    model.class_names = list(spec.get("class_names") or [str(c) for c in range(int(spec["num_classes"]))])
    return model


def load_checkpoint(path: str | Path, **expected: Any) -> nn.Module:
    """The trained model of a System checkpoint, in eval mode, with `class_names`: ``zoo.load_checkpoint(...)``.

    Keyword arguments (`model_name`, `num_classes`, `in_chans`) state what the caller expects; a checkpoint
    holding something else raises `CheckpointError` naming the difference, and another keyword raises (a typo would
    otherwise check nothing).
    """
    unknown = sorted(set(expected) - set(EXPECTABLE))
    if unknown:
        close = {key: close_names(key, EXPECTABLE, n=1, cutoff=0.6) for key in unknown}
        hints = ", ".join(f"{key!r}" + (f" (did you mean {close[key][0]!r}?)" if close[key] else "") for key in unknown)
        raise TypeError(f"load_checkpoint() checks only {EXPECTABLE}; got {hints}.")
    return _model_of(read_checkpoint(path), f"checkpoint {str(path)!r}", expected)


def _model_of(checkpoint: dict[str, Any], source: str, expected: dict[str, Any]) -> nn.Module:
    """The model of a System checkpoint already read (`load_checkpoint`)."""
    spec = model_spec(checkpoint["hyper_parameters"])
    check_same_model(spec, expected, source)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return _with_class_names(_load_weights(_build(spec), state, source), checkpoint["hyper_parameters"])


def export_checkpoint(path: str | Path, folder: str | Path) -> Path:
    """Write `model.safetensors` and `config.json` (registry name, constructor inputs, class_names) for inference."""
    from safetensors.torch import save_file

    checkpoint = read_checkpoint(path)  # read once: the model and its spec come from the same file
    model = _model_of(checkpoint, f"checkpoint {str(path)!r}", {})
    spec = {**model_spec(checkpoint["hyper_parameters"]), "class_names": model.class_names}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights_tmp, config_tmp = folder / ".model.safetensors.tmp", folder / ".config.json.tmp"
    save_file(state, str(weights_tmp))
    config_tmp.write_text(json.dumps(spec, indent=1, default=str))
    os.replace(weights_tmp, folder / "model.safetensors")  # atomic: a killed export leaves whole files only
    os.replace(config_tmp, folder / "config.json")
    return folder


def load_exported(folder: str | Path) -> nn.Module:
    """A model written by `export_checkpoint`, in eval mode, with its `class_names`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config, weights = folder / "config.json", folder / "model.safetensors"
    if not config.is_file() or not weights.is_file():
        raise CheckpointError(f"{str(folder)!r} needs config.json and model.safetensors (see export_checkpoint).")
    try:
        spec = json.loads(config.read_text())
        state = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as err:  # a truncated or overwritten file, not JSON / safetensors
        raise CheckpointError(f"Could not read the export {str(folder)!r} ({type(err).__name__}: {err}); export it "
                              f"again with export_checkpoint.") from err
    if not isinstance(spec, dict) or "model_name" not in spec or "num_classes" not in spec:
        raise CheckpointError(f"{str(config)!r} names no model_name and num_classes; it is not an export's config.")
    return _with_class_names(_load_weights(_build(spec), state, f"export {str(folder)!r}"), spec)

"""A trained model from a file: load it from a System checkpoint with `load_checkpoint`, export it as safetensors +
config.json with `export_checkpoint`, and load that back with `load_exported`. Above the registry (it builds models
by name) and `zoo.weights` (it reads the files); nothing here imports Lightning, but for the checkpoint of a run
whose data took `mean: pretrained`, which `load_checkpoint` resolves as the datamodules do (`data_config`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from zoo.checks import close_names
from zoo.registry import check_same_model, create_model_for_data
from zoo.weights import CheckpointError, checkpoint_replaces_weights, model_spec, read_checkpoint

EXPECTABLE = ("model_name", "num_classes", "in_chans")  # what `load_checkpoint` can check against a checkpoint


def _build(spec: dict[str, Any]) -> nn.Module:
    """The model of `spec`, to be filled with saved weights: built with every constructor input it was trained with
    (a `pretrained_path` too: AOG-RCNN's normalisation depends on it), but the weight file it started from is not
    read (`checkpoint_replaces_weights`): it may have moved since, and its tensors would be overwritten anyway."""
    with checkpoint_replaces_weights():
        return create_model_for_data(spec["model_name"], spec["num_classes"], spec.get("in_chans"),
                                     spec.get("image_size"), spec.get("data_inputs"), spec.get("model_kwargs"))


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {err}") from err
    return model.eval()


def _with_class_names(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """`model.class_names`: the names of its class ids as the data gave them ("0", "1", ... where none were saved).
    As many names as classes, else refused: an export's config.json renamed by hand to fewer names gave an
    IndexError at `class_names[pred]` for the classes past them."""
    names = list(spec.get("class_names") or [str(c) for c in range(int(spec["num_classes"]))])
    if len(names) != int(spec["num_classes"]):
        raise CheckpointError(f"class_names holds {len(names)} names ({names[:5]}{' ...' if len(names) > 5 else ''}) "
                              f"for num_classes={spec['num_classes']}: give one name per class id, in id order.")
    model.class_names = names
    return model


def data_config(model: nn.Module, spec: dict[str, Any], data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The timm `pretrained_cfg` of the images `model` was trained on (`input_size`, `mean`, `std`; `crop_pct` 1 and
    `interpolation`: the datamodules resize whole images), from the datamodule hyperparameters of its checkpoint, so
    that `timm.data.resolve_data_config({}, model=model)` gives what training used. `mean: pretrained` is resolved
    as the datamodule did, from the model's backbone; no mean: [0, 1] pixels (mean 0, std 1). None where unknown:
    no datamodule saved, or inputs that are not images."""
    in_chans, size = spec.get("in_chans"), (data or {}).get("image_size", spec.get("image_size"))
    if not data or in_chans is None or ("mean" not in data and "image_size" not in data):  # not image data
        return None
    mean, std = data.get("mean"), data.get("std")
    if mean == "pretrained":
        from datamodules._base import pretrained_normalization  # as the datamodules resolve it (grey: averages)
        from zoo.backbones import Backbone

        backbone = next((m for m in model.modules() if isinstance(m, Backbone)), None)
        if backbone is None:
            return None
        mean, std = pretrained_normalization(backbone.name, in_chans)
    if mean is None or std is None:
        mean, std = [0.0], [1.0]
    resize = data.get("upsample_mode")  # DigitsDataModule names its resizing; the others resize bilinearly
    config = {"mean": [float(m) for m in mean] * (in_chans if len(mean) == 1 else 1),
              "std": [float(s) for s in std] * (in_chans if len(std) == 1 else 1), "crop_pct": 1.0,
              "interpolation": resize if resize in ("nearest", "bilinear", "bicubic") else "bilinear"}
    if size is not None:
        config["input_size"] = [int(in_chans), *([int(size)] * 2 if isinstance(size, int) else map(int, size))]
    return config


def trained_normalization(path: str | Path) -> tuple[list[float], list[float]] | None:
    """The per-channel mean and std the images of a zoo run were normalised with, where `path` (a backbone's
    `pretrained_path`) is one of its files: a checkpoint (.ckpt: its datamodule's `mean` / `std`) or an export's
    model.safetensors (config.json's `pretrained_cfg` beside it); ([0.0], [1.0]) for [0, 1] pixels. None for any
    other weight file (timm's or torchvision's: their `pretrained_cfg` tells), for data that are no images, and for
    a run of `mean: pretrained` (its backbone's timm values, what `mean: pretrained` gives here too). Why: a model
    fine-tuned from a zoo run must see the images as that run did, not ImageNet's normalisation."""
    path = Path(path)
    if path.is_dir():  # an export's folder (`pretrained_path` takes it)
        path = path / "model.safetensors"
    config = path.parent / "config.json"
    if path.suffix == ".safetensors" and config.is_file():
        try:
            spec = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        cfg = spec.get("pretrained_cfg") if isinstance(spec, dict) and "model_name" in spec else None  # a zoo export
        mean, std = (cfg or {}).get("mean"), (cfg or {}).get("std")
        return _normalization(mean, std) if mean and std else None
    if path.suffix != ".ckpt" or not path.is_file():
        return None
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError:
        return None
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    if "model_name" not in (checkpoint.get("hyper_parameters") or {}) or "mean" not in data:  # no zoo image run
        return None
    mean, std = data.get("mean"), data.get("std")
    if mean is None and std is None:
        return [0.0], [1.0]
    return _normalization(mean, std)


def _normalization(mean: Any, std: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) as lists of floats (one value, or one per channel); None for anything else (a `pretrained`
    mean: its run's backbone's timm values; an unexpected value)."""
    def values(v: Any) -> list[float] | None:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return [float(v)]
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
            return [float(x) for x in v]
        return None

    mean, std = values(mean), values(std)
    return (mean, std) if mean is not None and std is not None else None


def _with_data_config(model: nn.Module, config: dict[str, Any] | None) -> nn.Module:
    """`model.pretrained_cfg` as timm models carry it (what `timm.data.resolve_data_config` reads: tuples for
    input_size, mean and std), where known."""
    if config:
        model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return model


def text_encoding(checkpoint: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any] | None:
    """How the checkpoint's model reads raw text, `datamodules.text.encode_texts`'s settings: {"vocabulary": id ->
    word, "max_len": ..., "tokenizer": version}, from the state a text datamodule (IMDB, CSV: `TokenDataModule`)
    saved under its class name, with the datamodule's `max_len` (else the model's `data_inputs`). None where the
    checkpoint holds no such state (image data; a text checkpoint written before the vocabulary was saved, whose
    words were the data's own). Why: token ids mean nothing without the words, and a model loaded or exported from
    the checkpoint must encode new text with the ones it learnt (`encode_texts(texts, **model.text_encoding)`)."""
    state = next((value for key, value in checkpoint.items()  # (a textual System's hyperparameters hold words too)
                  if isinstance(key, str) and not key.endswith("hyper_parameters") and isinstance(value, dict)
                  and isinstance(value.get("vocabulary"), list) and "tokenizer" in value), None)
    max_len = (checkpoint.get("datamodule_hyper_parameters") or {}).get("max_len",
                                                                      (spec.get("data_inputs") or {}).get("max_len"))
    if state is None or max_len is None:
        return None
    return {"vocabulary": [str(word) for word in state["vocabulary"]], "max_len": int(max_len),
            "tokenizer": int(state["tokenizer"])}


def _with_text_encoding(model: nn.Module, encoding: dict[str, Any] | None) -> nn.Module:
    """`model.text_encoding` (`text_encoding`), and `model.vocabulary` (token id -> word, to decode ids) where the
    model has none of its own (a textual model's comes from its model_kwargs), where known."""
    if encoding:
        model.text_encoding = {"vocabulary": list(encoding["vocabulary"]), "max_len": int(encoding["max_len"]),
                               "tokenizer": int(encoding["tokenizer"])}
        if getattr(model, "vocabulary", None) is None:
            model.vocabulary = list(encoding["vocabulary"])
    return model


def load_checkpoint(path: str | Path, **expected: Any) -> nn.Module:
    """The trained model of a System checkpoint, in eval mode, with `class_names` and, where the checkpoint saved
    its datamodule, `pretrained_cfg` (input size and normalisation, `data_config`) or, for text data, its
    `text_encoding` (the words, max_len and tokenizer new text is encoded with, `text_encoding`):
    ``zoo.load_checkpoint(...)``.
    A `pretrained_path` the run started from is not read (the checkpoint's weights replace it).

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
    model = _with_class_names(_load_weights(_build(spec), state, source), checkpoint["hyper_parameters"])
    model = _with_text_encoding(model, text_encoding(checkpoint, spec))
    return _with_data_config(model, data_config(model, spec, checkpoint.get("datamodule_hyper_parameters")))


def export_checkpoint(path: str | Path, folder: str | Path) -> Path:
    """Write `model.safetensors` and `config.json` for inference: registry name, constructor inputs (a
    `pretrained_path` among them is kept, as what the model started from, but never read again), class_names,
    `pretrained_cfg` (input_size, mean, std: the images it was trained on, `data_config`) where the checkpoint
    says, and for a model trained on a text datamodule (IMDB, CSV) its `text_encoding` (vocabulary, max_len,
    tokenizer: `encode_texts(texts, **model.text_encoding)` encodes new text as in training)."""
    from safetensors.torch import save_file

    checkpoint = read_checkpoint(path)  # read once: the model and its spec come from the same file
    model = _model_of(checkpoint, f"checkpoint {str(path)!r}", {})
    spec = {**model_spec(checkpoint["hyper_parameters"]), "class_names": model.class_names}
    if getattr(model, "pretrained_cfg", None):
        spec["pretrained_cfg"] = model.pretrained_cfg
    if getattr(model, "text_encoding", None):
        spec["text_encoding"] = model.text_encoding
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
    """A model written by `export_checkpoint`, in eval mode, with its `class_names` and, where the export has them,
    its `pretrained_cfg` (input size and normalisation, as timm models carry them) and `text_encoding` (with
    `vocabulary` where the model has none of its own; `text_encoding`)."""
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
    model = _with_class_names(_load_weights(_build(spec), state, f"export {str(folder)!r}"), spec)
    model = _with_text_encoding(model, _checked_text_encoding(spec.get("text_encoding"), config))
    return _with_data_config(model, spec.get("pretrained_cfg"))


def _checked_text_encoding(encoding: Any, config: Path) -> dict[str, Any] | None:
    """An export's `text_encoding`, refused by name unless it holds a list of words, max_len and tokenizer (a
    config.json edited by hand)."""
    if encoding is None:
        return None
    if not (isinstance(encoding, dict) and isinstance(encoding.get("vocabulary"), list)
            and isinstance(encoding.get("max_len"), int) and isinstance(encoding.get("tokenizer"), int)):
        raise CheckpointError(f"{str(config)!r}: text_encoding must be {{\"vocabulary\": [words], \"max_len\": int, "
                              f"\"tokenizer\": int}}; got {str(encoding)[:200]}. Export it again with "
                              f"export_checkpoint.")
    return encoding

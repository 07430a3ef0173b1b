"""Reading weights and checkpoints: safetensors or `torch.load(weights_only=True)`, wrapper prefixes
and key maps, and one error type (`CheckpointError`) that names the file and the keys.

Nothing here imports Lightning or the registry (the registry imports this module): a trained model built from a
checkpoint is `zoo.checkpoints`'s job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# Prefixes that wrappers put in front of parameter names (Lightning systems, DDP, torchvision detection backbones).
_WRAPPER_PREFIXES = ("model.", "module.", "backbone.body.", "backbone.")


class CheckpointError(ValueError):
    """A weight or checkpoint file that is missing, unreadable or does not fit the model it is loaded into."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, a `torch.save`d state dict, or the "state_dict" of a Lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weight file {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader error means the same thing to the user
        raise CheckpointError(
            f"Could not read weights from {str(path)!r} ({type(err).__name__}: {err}). Expected a .safetensors file, "
            "a state dict saved with torch.save, or a Lightning .ckpt; pickled modules are refused (weights_only=True)."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict (name -> tensor); got {type(obj).__name__}.")
    return obj


def _canonical(key: str) -> str:
    """Name with separators unified: timm's features_only nets flatten "features.0" into "features_0"."""
    return key.replace(".", "_")


def _unwrapped_names(key: str) -> list[str]:
    """`key`, then `key` with wrapper prefixes peeled off one at a time ("model.backbone.body.x" -> ... -> "x")."""
    names = [key]
    while prefix := next((p for p in _WRAPPER_PREFIXES if names[-1].startswith(p)), None):
        names.append(names[-1][len(prefix) :])
    return names


def match_state_dict(
    source: dict[str, torch.Tensor], target_keys: list[str]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename `source` keys onto `target_keys`, stripping wrapper prefixes and unifying separators.

    Returns:
        The renamed state dict, the target keys it lacks (missing) and the source keys that found no target
        (unexpected, e.g. a classifier head when loading into a backbone).
    """
    by_canonical = {_canonical(k): k for k in target_keys}
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in source.items():
        candidates = _unwrapped_names(key)
        target = next((by_canonical[_canonical(c)] for c in candidates if _canonical(c) in by_canonical), None)
        if target is None:
            unexpected.append(key)
        else:
            matched[target] = value
    missing = [k for k in target_keys if k not in matched]
    return matched, missing, unexpected


def load_module_weights(module: nn.Module, path: str | Path, prefix: str, what: str) -> None:
    """Weights for `module` from a state dict, safetensors file or Lightning checkpoint, whose keys carry `prefix`
    (e.g. "black_box." in an L2X checkpoint) or not (a plain state dict, a System's "model."-prefixed one);
    missing or mis-shaped weights raise CheckpointError naming `what`."""
    state = read_state_dict(path)
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    matched, missing, _ = match_state_dict(own or state, list(module.state_dict()))
    if missing:
        raise CheckpointError(f"{str(path)!r} does not hold weights for the {what} ({type(module).__name__}): "
                              f"missing {missing[:8]}.")
    try:
        module.load_state_dict(matched)
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r} does not fit the {what} ({type(module).__name__}): {err}") from err


@dataclass
class LoadReport:
    """What a pretrained file gave a model: the backbone tensors loaded (all of the backbone's, strictly), the file's
    tensors skipped (no place in the backbone, e.g. the ImageNet classifier) and the model's tensors outside the
    backbone that start from their initialisation (new: the zoo's head, ICNN filters, ...)."""

    path: str
    loaded: list[str]
    skipped: list[str]
    new: list[str] = field(default_factory=list)

    def summary(self, shown: int = 12) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")

        return (f"Pretrained weights {self.path!r}: loaded {len(self.loaded)} backbone tensors; skipped "
                f"{len(self.skipped)} [{names(self.skipped)}]; new {len(self.new)} [{names(self.new)}].")


def load_backbone_weights(body: nn.Module, path: str | Path, what: str) -> LoadReport:
    """Every tensor of `body` from a weight file, strictly: missing or mis-shaped tensors raise CheckpointError
    naming them; file tensors with no place in `body` (a classifier) are skipped and listed in the report."""
    own = body.state_dict()
    state, missing, unexpected = match_state_dict(read_state_dict(path), list(own))
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if v.shape != own[k].shape]
    if missing or bad_shapes:
        raise CheckpointError(
            f"{str(path)!r} does not fit {what}: {len(missing)} missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; shape mismatches {bad_shapes[:8]}."
        )
    body.load_state_dict(state)  # strict: every key of `body` is in `state`
    return LoadReport(str(path), list(state), unexpected)


def log_load_reports(model: nn.Module) -> None:
    """Complete the load report of every pretrained backbone in `model` with the model's tensors outside that
    backbone (new), and log it: what fine-tuning starts from, in one line."""
    keys = list(model.state_dict())
    for name, module in model.named_modules():
        report = getattr(module, "load_report", None)
        if isinstance(report, LoadReport):
            report.new = [k for k in keys if not k.startswith(f"{name}.")] if name else []
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
        raise CheckpointError(f"Could not read checkpoint {str(path)!r} ({type(err).__name__}: {err}); pickled "
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


def check_same_model(checkpoint_spec: dict[str, Any], wanted: dict[str, Any], source: str) -> None:
    """Raise naming the difference when a checkpoint holds another model or class count than the one asked for."""
    for key in ("model_name", "num_classes", "in_chans"):
        if key in wanted and wanted[key] is not None and checkpoint_spec.get(key) != wanted[key]:
            raise CheckpointError(f"{source} holds {describe(checkpoint_spec)} ({key}={checkpoint_spec.get(key)!r}); "
                                  f"this run builds {describe({**checkpoint_spec, **wanted})} ({key}={wanted[key]!r}).")


IDENTITY_KEYS = ("model_name", "variant")  # what names the model a System builds (classifiers; textual variants)


def check_config_fits_checkpoint(model_config: Any, checkpoint: dict[str, Any], source: str,
                                 resuming: bool = False) -> None:
    """Refuse a checkpoint of another System class or model than a parsed CLI model config (a jsonargparse
    Namespace with class_path / init_args) builds, naming both; before anything is built or trained. `resuming`
    (fit): also one trained with other values of the System's `RESUME_KEYS` (test and predict take the
    checkpoint's, as Lightning copies its hyperparameters over the config)."""
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
            raise CheckpointError(f"{source} holds {name(held)} ({key}={held[key]!r}); this config builds "
                                  f"{name(wanted)} ({key}={wanted[key]!r}). Resume a run with its own config, or "
                                  f"start this one without --ckpt_path.")
    if resuming and wanted["class"] is not None:
        from zoo.engine.system import _resolve, check_resume_keys

        check_resume_keys(_resolve(wanted["class"]), saved, init_args, source)


def load_system_weights(system: nn.Module, path: str | Path) -> None:
    """A System checkpoint's weights into `system`: the System's own compatibility check first (its
    `on_load_checkpoint`, which names another model or class count), then every key must match."""
    checkpoint = read_checkpoint(path)
    if hasattr(system, "on_load_checkpoint"):
        system.on_load_checkpoint(checkpoint)
    missing, unexpected = system.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not fit {type(system).__name__}: missing {list(missing)[:8]}, "
                              f"unexpected {list(unexpected)[:8]}.")

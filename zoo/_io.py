"""Reading weight files safely: safetensors or `torch.load(weights_only=True)`, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import torch

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

"""`--device` for every benchmark: the torch device models and data run on (cpu by default, so nothing needs a GPU;
cuda, cuda:1, ... where available), and the same choice for scripts that train through a Lightning Trainer or
the CLI."""

from __future__ import annotations

import argparse

import torch


def parse_device(name: str) -> torch.device:
    """A torch device, refused with a clear message when it does not exist or CUDA is not available here."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device (cpu, cuda, cuda:1, ...): {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device` (default cpu), parsed into a torch.device."""
    parser.add_argument("--device", type=parse_device, default="cpu",
                        help="device the models and data run on: cpu (default), or cuda / cuda:N where available")


def device_name(device: torch.device) -> str:
    """What a benchmark's header says it ran on: the GPU's name, or the CPU and its thread count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def trainer_kwargs(device: torch.device) -> dict[str, object]:
    """pl.Trainer arguments that train on `device`."""
    return {"accelerator": device.type, "devices": [device.index] if device.index is not None else 1}


def trainer_overrides(device: torch.device) -> list[str]:
    """CLI overrides (train.py / ZooCLI) that train on `device`; later overrides still win."""
    devices = [f"--trainer.devices=[{device.index}]"] if device.index is not None else []
    return [f"--trainer.accelerator={device.type}", *devices]

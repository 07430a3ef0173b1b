"""Every textual variant trains only parameters its loss reaches: DDP (find_unused_parameters off, README's default
for every family) stops at the first step on a trainable parameter without a gradient. description and
explanation-dis built a label embedding they never read, definition an image projection; the unread layers are
frozen at build (state_dict keys kept), and the configs' stage chains (description -> explanation-dis,
explanation-label -> explanation) still load and train what they read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from zoo.textual.model import VARIANTS
from zoo.textual.system import TextualSystem

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "textual"
TINY = {"vocab_size": 10, "hidden": 16, "max_len": 6, "image_size": 16}  # tiny vocabulary, generator and images
VARIANT_CONFIGS = {yaml.safe_load(path.read_text())["model"]["init_args"]["variant"]: path
                   for path in sorted(CONFIGS.glob("*.yaml"))}


def config_args(variant: str) -> dict[str, Any]:
    """The model's init_args of the variant's config, without the optimiser (the System's default stands in)."""
    args = dict(yaml.safe_load(VARIANT_CONFIGS[variant].read_text())["model"]["init_args"])
    args.pop("optimizer", None)
    return args


def build(variant: str, folder: Path, **overrides: Any) -> TextualSystem:
    """The System as configs/textual/<variant>.yaml builds it, tiny. A config that starts from an earlier stage's
    checkpoint (`init_checkpoint`, checkpoints/textual_<stage>/...) gets one of that stage's variant, built the same
    way and saved as a run would save it (an `init_checkpoint` in `overrides` is taken as it is)."""
    args = {**config_args(variant), **TINY, **overrides}
    if args.get("init_checkpoint") is not None and "init_checkpoint" not in overrides:
        stage = Path(args["init_checkpoint"]).parts[1].removeprefix("textual_")  # explanation_label, description
        earlier = build(next(v for v in VARIANTS if v.replace("-", "_") == stage), folder)
        path = folder / f"{stage}.ckpt"
        torch.save({"state_dict": earlier.state_dict(), "hyper_parameters": dict(earlier.hparams)}, path)
        args["init_checkpoint"] = str(path)
    return TextualSystem(**args)


def batch(size: int = 4, references: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    """Images, labels and reference sentences <bos> words <eos> <pad>... (one all-padding row, as CUB has)."""
    generator = torch.Generator().manual_seed(0)
    captions = torch.randint(3, TINY["vocab_size"], (size, references, length), generator=generator)
    ends = torch.randint(2, length, (size, references), generator=generator)
    position = torch.arange(length)
    captions = torch.where(position == ends[..., None], 2, captions).masked_fill(position > ends[..., None], 0)
    captions[:, :, 0] = 1
    captions[0, -1] = 0  # an image with a missing sentence
    return {"image": torch.randn(size, 3, TINY["image_size"], TINY["image_size"], generator=generator),
            "label": torch.arange(size) % 6, "captions": captions}


def training_step_loss(system: TextualSystem, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss `ZooSystem._step` returns for a training batch (the terms the current stage sums)."""
    out = system.forward_batch(data, "train")
    return torch.stack(list(system.schedule.select(system.compute_loss(out, data, "train")).values())).sum()


def without_gradient(system: TextualSystem) -> list[str]:
    return [name for name, p in system.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("discriminative_weight", [0.0, 0.2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_trainable_parameter_gets_a_gradient(variant: str, discriminative_weight: float,
                                                   tmp_path: Path) -> None:
    """One training step of each variant as its config builds it (and with / without the discriminative loss):
    every parameter with requires_grad has a gradient (what DDP requires), and the optimiser steps."""
    torch.manual_seed(0)
    system = build(variant, tmp_path, discriminative_weight=discriminative_weight).train()
    optimizer = system.configure_optimizers()
    loss = training_step_loss(system, batch())
    loss.backward()
    assert without_gradient(system) == [], variant
    assert any(p.grad is not None for p in system.model.generator.parameters())  # not vacuous
    optimizer.step()
    if discriminative_weight:
        assert float(system.loss.discriminative.baseline) > 0  # the REINFORCE path ran


def test_unread_layers_are_kept_frozen_and_the_config_chains_load(tmp_path: Path) -> None:
    """The unread layers stay in the state_dict, frozen, so the configs' stage 2 loads its stage-1 checkpoint of
    another variant (every weight) and trains what it reads (explanation: the class embedding explanation-label
    trained); a staged schedule's "all" stage restores the as-built state, unread layers frozen."""
    frozen = {variant: sorted(name for name, p in build(variant, tmp_path).model.named_parameters()
                              if not p.requires_grad and not name.startswith("image_encoder."))
              for variant in VARIANTS}
    assert frozen == {"definition": ["image_proj.bias", "image_proj.weight"], "description": ["class_embed.weight"],
                      "explanation-label": [], "explanation-dis": ["class_embed.weight"], "explanation": []}
    for variant, trains_class in (("explanation", True), ("explanation-dis", False)):
        chained = build(variant, tmp_path)  # from the config's stage 1, saved in tmp_path
        stage = config_args(variant)["init_checkpoint"].split("/")[1].removeprefix("textual_")
        saved = torch.load(tmp_path / f"{stage}.ckpt", weights_only=True)["state_dict"]
        assert all(torch.equal(saved[k], v) for k, v in chained.state_dict().items() if k.startswith("model."))
        assert chained.model.class_embed.weight.requires_grad == trains_class, variant
    staged = build("description", tmp_path, stages=[{"name": "generator", "epochs": 1, "train": ["generator"]},
                                                    {"name": "all", "epochs": 1}])
    for epoch in (0, 1):
        staged.schedule.start_epoch(staged.model, None, epoch)
    assert not staged.model.class_embed.weight.requires_grad and staged.model.image_proj.weight.requires_grad
    loss = training_step_loss(staged.train(), batch())
    loss.backward()
    assert without_gradient(staged) == []


def test_a_fine_tuned_encoder_trains_without_its_unread_head(tmp_path: Path) -> None:
    """`train_encoder`: preparation leaves the whole encoder trainable (as `prepare_auxiliaries` does); the head,
    which the generator never reads (features are pooled before it), is frozen again at setup, before DDP."""
    torch.manual_seed(0)
    system = build("explanation-label", tmp_path, train_encoder=True).train()
    system.model.image_encoder.requires_grad_(True)  # what preparing a trainable_after auxiliary leaves
    system.setup("fit")
    training_step_loss(system, batch()).backward()
    assert without_gradient(system) == []
    assert any(p.requires_grad for p in system.model.image_encoder.parameters())  # the rest is fine-tuned

"""Every family trains under Lightning's true precisions (`--trainer.precision=bf16-true`, `64-true`: the model's
parameters and the batch in bf16 or float64, no autocast), its pictures included.

Each broke somewhere Lightning's conversion does not reach: the picture callbacks ran the model outside the steps
(float32 fixed batch into a bf16 model: the first validation epoch's end raised and the epoch was lost with its
checkpoint), L2X's float32 selection times a bf16 input reached bf16 layers, ReNN's float32 rule maps a bf16 Conv1d,
AOG R-CNN's nms got boxes and scores of two dtypes (RPN under bf16-true, detections under 64-true), and the textual
metrics' mention matrix took the default dtype that Lightning sets to the run's. One short fit per case (one
training and one validation batch, tiny data): it finishes with finite losses and the parameters in the run's dtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from train import main

TINY_WORLD = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
              "--data.init_args.batch_size=8"]
TINY_SELECTOR = ["--model.init_args.black_box_epochs=1", "--model.init_args.evaluator_epochs=1"]
TINY_TEXTUAL = ["--model.init_args.encoder_epochs=1", "--model.init_args.sentence_classifier_epochs=1",
                "--model.init_args.init_checkpoint=null"]
DTYPES = {"bf16-true": torch.bfloat16, "64-true": torch.float64}


def callbacks(class_path: str, **init_args: int) -> str:
    """A `--trainer.callbacks` of one picture callback, small (a picture of many panels takes seconds to draw)."""
    args = ", ".join(f"{name}: {value}" for name, value in init_args.items())
    return f"--trainer.callbacks=[{{class_path: {class_path}, init_args: {{{args}}}}}]"


# case -> (config, precision, its tiny data and settings)
CASES: dict[str, tuple[str, str, list[str]]] = {
    # picture callbacks (the fixed batch in the run's dtype, drawn in its precision context)
    "protopnet": ("configs/protopnet/parts_world.yaml", "bf16-true", [*TINY_WORLD, callbacks(
        "zoo.protopnet.callback.PrototypesCallback", num_images=2, top_k=1)]),
    # CBM's pictures and its intervention curve (which encodes the validation split outside the steps)
    "cbm": ("configs/cbm/parts_world.yaml", "64-true", [*TINY_WORLD, "--trainer.callbacks=[{class_path: "
            "zoo.cbm.callback.ConceptsCallback, init_args: {num_images: 2}}, {class_path: "
            "zoo.cbm.callback.InterventionCallback, init_args: {num_points: 3}}]"]),
    "l2x_patches": ("configs/l2x/digits.yaml", "bf16-true", TINY_SELECTOR),
    # the float32 selection (L2X's Gumbel draw, INVASE's threshold) meets a bf16 input
    "l2x_vector": ("configs/l2x/xor.yaml", "bf16-true",
                   [*TINY_SELECTOR, "--data.init_args.num_train=64", "--data.init_args.num_val=32"]),
    "invase_vector": ("configs/l2x/invase_switch.yaml", "bf16-true",
                      ["--data.init_args.num_train=64", "--data.init_args.num_val=32"]),
    # float32 rule maps into the bf16 global inference
    "renn": ("configs/renn/rule_series.yaml", "bf16-true",
             ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.batch_size=8"]),
    # nms: float32 proposals with bf16 objectness (RPN), float64 boxes with float32 scores (detections)
    "aog_rcnn_bf16": ("configs/aog_rcnn/parts_world_scenes.yaml", "bf16-true", TINY_WORLD[:3] + [
        "--data.init_args.batch_size=2"]),
    "aog_rcnn_64": ("configs/aog_rcnn/parts_world_scenes.yaml", "64-true", TINY_WORLD[:3] + [
        "--data.init_args.batch_size=2"]),
    # the mention matrix of the generated sentences (validation metrics) in the default dtype
    "textual": ("configs/textual/explanation_label.yaml", "bf16-true", [*TINY_TEXTUAL, *TINY_WORLD]),
}


def fit(config: str, precision: str, extra: list[str], *run: str) -> object:
    """`train.py fit` of `config` under `precision`, one training and one validation batch."""
    return main(["fit", "--config", str(REPO / config), f"--trainer.precision={precision}", *run, *extra])


def assert_finished_in(cli: object, precision: str) -> None:
    """The fit finished with finite losses, its parameters in the precision's dtype."""
    trainer, system = cli.trainer, cli.model
    assert trainer.state.finished
    losses = {name: value for name, value in trainer.callback_metrics.items() if name.split("/")[-1].startswith("loss")}
    assert "train/loss" in losses, sorted(trainer.callback_metrics)
    assert all(torch.isfinite(value) for value in losses.values()), losses
    assert {p.dtype for p in system.model.parameters() if p.is_floating_point()} == {DTYPES[precision]}


@pytest.mark.parametrize("case", list(CASES))
def test_every_family_fits_under_a_true_precision(case: str, in_tmp_dir: Path) -> None:
    config, precision, extra = CASES[case]
    cli = fit(config, precision, extra, "--trainer.fast_dev_run=true")  # validation, pictures too (no files)
    assert_finished_in(cli, precision)


def test_pictures_are_drawn_and_the_epoch_checkpointed_under_bf16_true(in_tmp_dir: Path) -> None:
    """The audit's run: ICNN's filter maps at the first validation epoch's end raised under bf16-true (float32
    fixed batch, bf16 backbone), after training and before the checkpoint, which was lost. Now the picture is
    written and the epoch checkpointed; the kept fixed batch stays float32 (converted for each drawing only)."""
    small = callbacks("zoo.icnn.callback.FilterMapsCallback", num_filters=2, num_images=2)
    cli = fit("configs/icnn/parts_world.yaml", "bf16-true", [*TINY_WORLD, small], "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0")
    assert_finished_in(cli, "bf16-true")
    run = in_tmp_dir / "checkpoints" / "icnn_parts_world"
    assert (run / "filters" / "epoch0.png").stat().st_size > 0
    assert list((run / "checkpoints").glob("*.ckpt")), sorted(p.name for p in run.rglob("*"))
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "FilterMapsCallback"]
    assert callback.batch["image"].dtype == torch.float32
    assert callback.fixed_batch(cli.trainer)["image"].dtype == torch.bfloat16


def test_metric_states_keep_float32_when_lightning_converts_the_system_to_bf16() -> None:
    """bf16-true converts the System with `module.to(dtype=torch.bfloat16)`, which torchmetrics does not guard: every
    float metric state became bf16, exact for whole numbers only up to 256 (the audit: part consistency of 1,000
    images, 70% on one part, read 256 images and scored 1.0 instead of 0.0, no warning). The engine keeps them
    float32 whatever converts it; integer states stay integer, bf16 inputs still update them."""
    from pytorch_lightning.plugins.precision import HalfPrecision
    from torchmetrics import SumMetric

    from zoo.protopnet.system import ProtoPNetSystem

    system = ProtoPNetSystem(model_name="protopnet_tinycnn", num_classes=2, image_size=64,
                             model_kwargs={"prototypes_per_class": 1, "prototype_channels": 8})
    system.add_metric("total", SumMetric())
    HalfPrecision("bf16-true").convert_module(system)  # what Lightning does before fit / validate / test / predict
    assert {p.dtype for p in system.model.parameters()} == {torch.bfloat16}
    states = {f"{name}.{key}": getattr(metric, key) for name, metric in system.metrics.items()
              for key in metric._defaults}
    assert {name: value.dtype for name, value in states.items()
            if value.dtype in (torch.bfloat16, torch.float16)} == {}
    assert states["val_acc.tp"].dtype == torch.long  # integer states untouched
    total = system.metrics["val_total"]
    total.update(torch.ones(257, dtype=torch.bfloat16))  # a bf16 input into a float32 sum: 257, not bf16's 256
    assert total.compute() == 257
    # 1,000 images of unit 0: 700 hit part type 0 (top-left pixel), 300 part type 1 (bottom-right): 70% < 80%
    count = 1000
    maps = torch.zeros(count, 1, 2, 2, dtype=torch.bfloat16)
    maps[:700, 0, 0, 0] = maps[700:, 0, 1, 1] = 1
    masks = torch.zeros(count, 2, 2, 2, dtype=torch.bool)
    masks[:, 0, 0, 0] = masks[:, 1, 1, 1] = True
    parts = system.metrics["val_parts"]
    parts.update(maps, torch.zeros(count, 1, dtype=torch.long), masks, torch.tensor([[0, 1]]).expand(count, 2))
    assert parts.images[0] == count and parts.hits[0, :2].tolist() == [700, 300]
    assert parts.compute()["consistency"] == 0.0
    system.to(torch.bfloat16)  # a user's conversion, after the states hold counts: kept as they are
    assert parts.images.dtype == torch.long and parts.iou.dtype == torch.float32 and parts.images[0] == count


# the config's schedule, one epoch a stage, without the joint stage
TWO_STAGES = ("--model.init_args.stages=[{name: warm_up, epochs: 1, train: [add_on, prototypes], losses: [loss_task, "
              "loss_cluster, loss_separation]}, {name: last_layer, epochs: 1, train: [last_layer], losses: [loss_task, "
              "loss_l1]}]")


@pytest.mark.parametrize("precision", list(DTYPES))
def test_protopnet_pushes_under_a_true_precision(precision: str, in_tmp_dir: Path) -> None:
    """Push ran the backbone on the loader's float32 images: under bf16-true and 64-true the first pushing stage
    raised ("expects images of dtype torch.bfloat16") and the fit (compare, ablate) died; fast_dev_run never pushes.
    Now push reads the images in the run's precision, moves every prototype and keeps their dtype."""
    cli = fit("configs/protopnet/parts_world.yaml", precision,
              [*TINY_WORLD, "--data.init_args.num_classes=4", "--trainer.callbacks=[]", TWO_STAGES],
              "--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
              "--trainer.num_sanity_val_steps=0")  # push at the start of last_layer, as configured
    assert_finished_in(cli, precision)
    layer = cli.model.model.prototypes
    assert cli.trainer.callback_metrics["push/pushed"] == 1.0 and (layer.source_index >= 0).all()
    assert layer.vectors.dtype == DTYPES[precision]


# the compare twins Lightning converts too: (model, its settings, its input)
TWINS = {
    # no add-on layers: z reached the bf16 last layer promoted to float32 ("mat1 and mat2 must have the same dtype")
    "protopnet linear_head": ("protopnet_tinycnn", {"num_classes": 3, "head": "linear", "add_on": False}),
    # torchvision's roi_align got bf16 features with float32 proposals ("input should have the same type as rois")
    "aog_rcnn two_mlp_head": ("faster_rcnn_tinycnn", {"num_classes": 3, "image_size": 64}),
}


@pytest.mark.parametrize("twin", list(TWINS))
def test_compare_twins_train_and_predict_in_bf16(twin: str) -> None:
    """bf16-true (the model's parameters in bf16, no autocast) for the compare twins the fits above do not build:
    one training step's loss is finite with bf16 gradients, and the twin predicts in eval mode."""
    from zoo import create_model

    name, kwargs = TWINS[twin]
    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(torch.bfloat16)
    if name.startswith("faster_rcnn"):
        images = [torch.rand(3, 64, 64, dtype=torch.bfloat16)]
        targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}]
        loss = sum(model(images, targets).values())
        model.eval()
        assert len(model(images)) == 1
    else:
        out = model(torch.rand(2, 3, 64, 64, dtype=torch.bfloat16))
        assert out["logits"].dtype == torch.bfloat16
        loss = out["logits"].float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.bfloat16}

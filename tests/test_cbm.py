"""Concept bottleneck models: shapes and registry, each mode's loss terms and gradients, interventions, metrics,
the CLI (fit and compare with the standard twin)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml

import zoo
from losses.cbm import ConceptBottleneckLoss
from tests.conftest import REPO
from zoo.cbm.intervene import intervention_curve, replacement_values
from zoo.cbm.metrics import ConceptAccuracy, ConceptF1, concept_f1
from zoo.cbm.system import CBMSystem

NUM_CLASSES, NUM_CONCEPTS = 4, 36
SMALL_WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]
SEQUENTIAL_STAGES = [{"name": "concepts", "train": ["backbone", "concept_head"], "losses": ["loss_concept"]},
                     {"name": "task", "train": ["task_head"], "losses": ["loss_task"]}]


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.rand(6, 3, 32, 32, generator=generator),
            "label": torch.arange(6) % NUM_CLASSES,
            "attributes": (torch.rand(6, NUM_CONCEPTS, generator=generator) < 0.2).float()}


def system(**kwargs) -> CBMSystem:
    torch.manual_seed(0)
    kwargs.setdefault("loss", ConceptBottleneckLoss(weight=0.5))
    kwargs.setdefault("model_name", "cbm_tinycnn")
    return CBMSystem(num_classes=NUM_CLASSES, image_size=32, **kwargs)


@pytest.mark.parametrize("name", ["cbm_tinycnn", "cem_tinycnn", "cbm_resnet18", "cbm_timm"])
def test_registered_models_output_concepts_and_logits(name: str) -> None:
    model = zoo.create_model(name, num_classes=NUM_CLASSES, num_concepts=7, in_chans=1)
    out = model(torch.rand(2, 1, 64, 64))
    assert out["concept_logits"].shape == out["concept_probs"].shape == (2, 7) and out["logits"].shape == (2, 4)
    assert torch.equal(out["concept_probs"], out["concept_logits"].sigmoid())
    assert zoo.model_family(name) == "cbm"
    assert model.task_head.in_features == (7 * 16 if name.startswith("cem") else 7)  # f reads only the bottleneck


def test_timm_backbone_by_name() -> None:
    model = zoo.create_model("cbm_timm", backbone="mobilenetv3_small_050", num_classes=3, num_concepts=5)
    assert model(torch.rand(2, 3, 32, 32))["logits"].shape == (2, 3)


def test_loss_terms_match_hand_computed_values(batch: dict[str, torch.Tensor]) -> None:
    out = {"logits": torch.randn(6, NUM_CLASSES), "concept_logits": torch.randn(6, NUM_CONCEPTS)}
    terms = ConceptBottleneckLoss(weight=0.3)(out, batch)
    probs = out["concept_logits"].sigmoid()
    bce = -(batch["attributes"] * probs.log() + (1 - batch["attributes"]) * (1 - probs).log()).mean()
    assert set(terms) == {"loss_task", "loss_concept"}
    torch.testing.assert_close(terms["loss_task"], F.cross_entropy(out["logits"], batch["label"]))
    torch.testing.assert_close(terms["loss_concept"], 0.3 * bce)
    assert ConceptBottleneckLoss(weight=0.0)(out, batch)["loss_concept"] == 0


def gradients(cbm: CBMSystem, batch: dict[str, torch.Tensor], term: str) -> set[str]:
    """The model's children whose parameters get a non-zero gradient from one loss term of a training step."""
    cbm.model.zero_grad()
    terms = cbm.compute_loss(cbm.forward_batch(batch, "train"), batch, "train")
    terms[term].backward()
    return {name for name, child in cbm.model.named_children()
            if any(p.grad is not None and p.grad.any() for p in child.parameters())}


@pytest.mark.parametrize("mode, stages, task_reaches, concept_reaches", [
    ("joint", None, {"backbone", "concept_head", "task_head"}, {"backbone", "concept_head"}),
    ("independent", None, {"task_head"}, {"backbone", "concept_head"}),  # f learns from the true concepts
    ("sequential", SEQUENTIAL_STAGES, {"task_head"}, {"backbone", "concept_head"}),  # f reads detached predictions
])
def test_each_mode_trains_what_the_paper_says(mode: str, stages: list | None, task_reaches: set[str],
                                              concept_reaches: set[str], batch: dict[str, torch.Tensor]) -> None:
    cbm = system(model_name="cbm_tinycnn", mode=mode, stages=stages)
    assert gradients(cbm, batch, "loss_task") == task_reaches
    assert gradients(cbm, batch, "loss_concept") == concept_reaches


def test_independent_f_reads_true_concepts_in_training_and_predictions_in_evaluation(batch) -> None:
    cbm = system(model_name="cbm_tinycnn", mode="independent")
    assert torch.equal(cbm.forward_batch(batch, "train")["concept_probs"], batch["attributes"])
    val = cbm.forward_batch(batch, "val")
    assert torch.equal(val["concept_probs"], val["concept_logits"].sigmoid())
    expected = cbm.model.task_head(batch["attributes"])  # every concept replaced by the truth
    torch.testing.assert_close(val["logits_intervened"], expected)


def test_standard_twin_trains_the_network_on_the_label_and_only_the_probe_on_concepts(batch) -> None:
    cbm = system(model_name="cbm_tinycnn", model_kwargs={"bottleneck": False})
    assert gradients(cbm, batch, "loss_task") == {"backbone", "task_head"}
    assert gradients(cbm, batch, "loss_concept") == {"concept_head"}  # a linear probe on detached features


def test_cem_randint_replaces_concepts_by_the_truth_in_training_only(batch: dict[str, torch.Tensor]) -> None:
    always = system(model_name="cem_tinycnn", train_intervention=1.0)
    assert torch.equal(always.forward_batch(batch, "train")["concept_probs"], batch["attributes"])
    val = always.forward_batch(batch, "val")
    assert torch.equal(val["concept_probs"], val["concept_logits"].sigmoid())
    assert gradients(always, batch, "loss_task") == {"backbone", "concept_head", "task_head"}  # via the embeddings


def test_bad_settings_are_clear_errors(batch: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        system(mode="together")
    with pytest.raises(ValueError, match="give two stages"):
        system(mode="sequential")
    with pytest.raises(ValueError, match="concept embedding model trains jointly"):
        system(model_name="cem_tinycnn", mode="independent")
    with pytest.raises(ValueError, match="predicts 7 concepts"):
        system(model_kwargs={"num_concepts": 7}).forward_batch(batch, "train")


def label_function_model(definition: torch.Tensor) -> zoo.cbm.model.ConceptBottleneckModel:
    """A CBM whose f is the world's label function: class c scores the number of its part types present."""
    model = zoo.create_model("cbm_tinycnn", num_classes=len(definition), num_concepts=NUM_CONCEPTS).eval()
    membership = torch.zeros(len(definition), NUM_CONCEPTS).scatter_(1, definition, 1.0)  # (C, K)
    with torch.no_grad():
        model.task_head.weight.copy_(membership)
        model.task_head.bias.zero_()
    return model


@pytest.mark.parametrize("values", ["hard", "percentile"])
def test_intervening_on_every_concept_gives_the_label_function_and_k0_the_plain_prediction(values: str) -> None:
    from datamodules.parts_world import make_world

    world = make_world(6, 3, world_seed=0)
    model = label_function_model(world.part_types)
    labels = torch.arange(60) % 6
    concepts = torch.zeros(60, NUM_CONCEPTS).scatter_(1, world.part_types[labels], 1.0)
    encoded = {"concept_logits": torch.randn(60, NUM_CONCEPTS, generator=torch.Generator().manual_seed(1))}
    curve = intervention_curve(model, encoded, concepts, labels, seed=3, values=values)
    plain = (model.decode(encoded)["logits"].argmax(-1) == labels).float().mean()
    assert curve["k"] == list(range(NUM_CONCEPTS + 1)) and sorted(curve["order"]) == list(range(NUM_CONCEPTS))
    assert curve["acc"][0] == pytest.approx(float(plain)) and curve["acc"][-1] == 1.0
    again = intervention_curve(model, encoded, concepts, labels, ks=[0, 5, 36], seed=3, values=values)
    assert again["acc"] == [curve["acc"][k] for k in (0, 5, 36)]  # the order depends on the seed only


def test_percentile_values_are_the_5th_and_95th_percentile_logits() -> None:
    logits = torch.arange(101, dtype=torch.float32)[:, None].expand(101, 2)  # percentile p is p
    truth = torch.tensor([[1.0, 0.0]]).expand(101, 2)
    values = replacement_values(logits, truth, "percentile")
    torch.testing.assert_close(values[0], torch.tensor([95.0, 5.0]).sigmoid())


def test_config_worlds_label_is_a_function_of_the_concepts() -> None:
    """Every cbm config's world gives each class its own set of part types, so the concepts fix the label."""
    from datamodules.parts_world import make_world

    for path in sorted((REPO / "configs" / "cbm").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if "compare" in config:  # a compare spec: its runs are the configs checked here
            continue
        data = config["data"]["init_args"]
        assert not data.get("shared_part_types")
        world = make_world(data["num_classes"], data.get("parts_per_class", 3), data.get("world_seed", 0))
        sets = {tuple(sorted(types)) for types in world.part_types.tolist()}
        assert len(sets) == world.num_classes, path


def test_concept_metrics_match_hand_computed_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0], [-1.0, 1.0, 0.5, -3.0]])  # predicted: [1,0,1,0], [0,1,1,0]
    truth = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    accuracy, f1 = ConceptAccuracy(), ConceptF1(4)
    for metric in (accuracy, f1):  # two updates: the states add up
        metric.update(logits[:1], truth[:1])
        metric.update(logits[1:], truth[1:])
    assert accuracy.compute() == pytest.approx(6 / 8)
    # per concept (tp, fp, fn): c0 (1, 0, 1) -> 2/3; c1 (1, 0, 0) -> 1; c2 (1, 1, 0) -> 2/3; c3 never: left out
    torch.testing.assert_close(f1.per_concept()[:3], torch.tensor([2 / 3, 1.0, 2 / 3]))
    assert torch.isnan(f1.per_concept()[3]) and f1.compute() == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert concept_f1(f1.tp, f1.fp, f1.fn, "micro") == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert ConceptAccuracy.higher_is_better and ConceptF1.higher_is_better and not ConceptF1.full_state_update


def test_fit_writes_concept_pictures_and_the_intervention_curve(in_tmp_dir: Path) -> None:
    from train import main

    cli = main(["fit", "--config", str(REPO / "configs/cbm/parts_world.yaml"), "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
                *SMALL_WORLD])  # a run with a folder: fast_dev_run writes no pictures
    assert cli.trainer.state.finished
    assert {"train/loss_task", "train/loss_concept", "val/acc", "val/concept_acc", "val/concept_f1",
            "val/acc_intervened"} <= set(cli.trainer.callback_metrics)
    run = Path(cli.trainer.log_dir)
    assert (run / "concepts" / "epoch0.png").is_file() and "| image |" in (run / "concepts" / "epoch0.md").read_text()
    table = (run / "intervention" / "val.md").read_text()
    assert (run / "intervention" / "val.png").is_file() and "| 36 |" in table


def test_compare_trains_the_sequential_cbm_against_the_standard_twin(in_tmp_dir: Path) -> None:
    from train import main

    rows = main(["compare", "--config", str(REPO / "configs/cbm/sequential.yaml"), "--trainer.fast_dev_run=true",
                 "--explain_images=2", *SMALL_WORLD])
    assert [row["run"] for row in rows] == ["cbm", "standard"]
    assert {"acc", "concept_acc", "concept_f1", "acc_intervened"} <= set(rows[0])
    assert {"acc", "concept_acc", "concept_f1"} <= set(rows[1])  # the probe's concepts; f reads no concepts
    explained = (in_tmp_dir / "checkpoints" / "cbm_sequential_compare" / "explanations.csv").read_text()
    assert "saliency" in explained and "occlusion" in explained and "layer_gradcam" not in explained


def test_cub_attributes_are_voted_per_class_and_filtered_as_in_the_paper(cub_root: Path) -> None:
    """The release's attributes/image_attribute_labels.txt: attribute 1 is in every class (kept), 2 in one class
    (dropped), 3 in the training images of classes 0 and 1 (kept; every image of those classes gets it, test images
    too), 4 in half of class 0's training images (no majority: dropped). One line has the release's extra field."""
    from datamodules import CUB200DataModule, DatasetLayoutError

    base = cub_root / "CUB_200_2011"
    with pytest.raises(DatasetLayoutError, match="image_attribute_labels.txt' is missing"):
        CUB200DataModule(root=str(cub_root), attributes=True)
    ids_and_classes = [(image_id, n % 3, n < 5) for n, image_id in enumerate([3, 1, 2, 4, 8, 5, 7, 6])]
    lines = []
    for image_id, cls, train in ids_and_classes:
        present = [1, int(cls == 0), int(train and cls in (0, 1)), int(image_id == 3)]
        lines += [f"{image_id} {a + 1} {p} 3 10.5" for a, p in enumerate(present)]
    lines[0] += " 7.2"  # a line with an extra field, as in the release
    (base / "attributes").mkdir()
    (base / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    (cub_root / "attributes.txt").write_text("1 has_wing_color::blue\n2 has_bill_shape::hooked\n"
                                             "3 has_size::small\n4 has_eye_color::red\n")
    data = CUB200DataModule(root=str(cub_root), image_size=32, attributes=True, min_attribute_classes=2)
    data.setup("fit")
    assert data.attribute_names == ["has_wing_color::blue", "has_size::small"]
    for split in ("train", "val"):
        for sample in data.splits[split]:
            expected = torch.tensor([1.0, float(int(sample["label"]) in (0, 1))])
            assert torch.equal(sample["attributes"], expected)
    assert "attributes" not in CUB200DataModule(root=str(cub_root), image_size=32).split_samples("train")[0]


class SaveConceptPredictions(pl.Callback):
    """Each rank writes its validation concept predictions (logit > 0) and true concepts, (B, 2, K) per batch."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.rows = folder, []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                                batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = pl_module(batch["image"])["concept_logits"]  # (B, K)
        self.rows.append(torch.stack([(logits > 0).float(), batch["attributes"]], 1))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(torch.cat(self.rows), self.folder / f"rank{trainer.global_rank}.pt")


def test_two_process_ddp_concept_accuracy_equals_gathered(tmp_path: Path) -> None:
    """Under 2-process DDP the logged concept accuracy is the accuracy over both ranks' predictions."""
    from datamodules import PartsWorldDataModule

    pl.seed_everything(0)
    data = PartsWorldDataModule(num_train=64, num_val=64, num_test=16, batch_size=16)
    system = CBMSystem("cbm_tinycnn", num_classes=data.num_classes, model_kwargs={"num_concepts": 36},
                       loss=ConceptBottleneckLoss(weight=10.0))
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[SaveConceptPredictions(tmp_path)])
    trainer.fit(system, datamodule=data)
    rows = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)])  # (64, 2, K)
    assert len(rows) == 64
    recomputed = (rows[:, 0] == rows[:, 1]).float().mean()
    assert trainer.callback_metrics["val/concept_acc"].item() == pytest.approx(recomputed.item(), abs=1e-6)

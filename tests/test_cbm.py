"""Concept bottleneck models: shapes and registry, each mode's loss terms and gradients, interventions, metrics,
the CLI (fit and compare with the standard twin)."""

from __future__ import annotations

import warnings
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


@pytest.mark.parametrize("name", ["cbm_tinycnn", "cem_tinycnn"])
def test_concepts_and_interventions_are_float32_under_bf16_autocast(name: str, batch: dict[str, torch.Tensor]) -> None:
    """Under bf16 autocast the backbone runs in bf16, but the concept layer, its sigmoid and an intervention's values
    stay float32: bf16 concept logits kept 8 bits (494 distinct logits on 500 images, an AUROC ranked on ties) and
    the 5th / 95th percentile values were rounded to bf16 where f read them. Logits and probabilities equal the
    float32 concept layer on the (bf16) top map; the corrected concepts read the float32 values bit for bit."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=NUM_CLASSES).eval()
    images, truth = batch["image"], batch["attributes"]
    intervene = torch.rand(truth.shape, generator=torch.Generator().manual_seed(2)) < 0.5  # (B, K)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.forward_features(images)
            values = replacement_values(model.encode(images)["concept_logits"], truth)  # (B, K) percentile values
            out = model(images, values, intervene)
        expected = model.encode_features(features.float())["concept_logits"]  # float32, autocast off
    assert features.dtype == torch.bfloat16 and values.dtype == torch.float32
    assert out["concept_logits"].dtype == out["concept_probs"].dtype == torch.float32
    assert torch.equal(out["concept_logits"], expected)
    assert torch.equal(out["concept_probs"], torch.where(intervene, values, expected.sigmoid()))


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
    too), 4 in half of class 0's training images (a tie: present in class 0 only, so dropped). One line has the
    release's extra field."""
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
    """Each rank writes its validation concept predictions (logit > 0), true concepts and logits, (B, 3, K) per
    batch, and the System's per-concept table (a collective: every rank calls it)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.rows = folder, []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                                batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = pl_module(batch["image"])["concept_logits"]  # (B, K)
        self.rows.append(torch.stack([(logits > 0).float(), batch["attributes"], logits], 1))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(torch.cat(self.rows), self.folder / f"rank{trainer.global_rank}.pt")
        torch.save(pl_module.concept_table("val"), self.folder / f"table{trainer.global_rank}.pt")


def test_two_process_ddp_concept_accuracy_equals_gathered(tmp_path: Path) -> None:
    """Under 2-process DDP the logged concept accuracy is the accuracy over both ranks' predictions, and each
    concept's F1 and AUROC (`concept_table`, on every rank) are those of both ranks' predictions."""
    from sklearn.metrics import roc_auc_score

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
    rows = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)])  # (64, 3, K)
    assert len(rows) == 64
    recomputed = (rows[:, 0] == rows[:, 1]).float().mean()
    assert trainer.callback_metrics["val/concept_acc"].item() == pytest.approx(recomputed.item(), abs=1e-6)
    predicted, truth = rows[:, 0].bool(), rows[:, 1].bool()
    f1 = concept_f1((predicted & truth).sum(0), (predicted & ~truth).sum(0), (~predicted & truth).sum(0), "none")
    # the exact AUROC of the raw logits (sklearn's), NaN for single-valued concepts; not torchmetrics'
    # multilabel_auroc: it takes the sigmoid of every column once any logit is outside [0, 1], which rounds close
    # logits of a column to ties (here a concept whose logits all lay in 0.047-0.060 lost a pair: 0.3155, not 0.3149)
    positives = truth.sum(0)
    auroc = torch.tensor([roc_auc_score(truth[:, k].numpy(), rows[:, 2, k].double().numpy())
                          if 0 < positives[k] < len(truth) else float("nan") for k in range(36)])
    for rank in (0, 1):
        table = torch.load(tmp_path / f"table{rank}.pt", weights_only=True)
        torch.testing.assert_close(table["f1"], f1.float(), equal_nan=True)
        torch.testing.assert_close(table["auroc"], auroc, equal_nan=True, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- audit fixes (CBM family)
def test_default_loss_trains_the_concepts_on_the_systems_concept_key(batch: dict[str, torch.Tensor]) -> None:
    """Without `loss:` the System builds the paper's loss on its own concept_key: every mode gets a concept term
    (the engine's default, cross-entropy alone, trained no concept in joint / independent and broke sequential)."""
    renamed = {**{k: v for k, v in batch.items() if k != "attributes"}, "concepts": batch["attributes"]}
    for mode, stages in (("joint", None), ("independent", None), ("sequential", SEQUENTIAL_STAGES)):
        cbm = system(mode=mode, stages=stages, loss=None, concept_key="concepts")
        assert isinstance(cbm.loss, ConceptBottleneckLoss) and cbm.loss.concept_key == "concepts"
        terms = cbm.compute_loss(cbm.forward_batch(renamed, "train"), renamed, "train")
        assert set(terms) == {"loss_task", "loss_concept"} and terms["loss_concept"] > 0
        assert set(cbm.schedule.select(terms)) <= {"loss_task", "loss_concept"}  # sequential: no KeyError
    assert "loss_concept" in gradients_of(system(loss=None), batch)


def gradients_of(cbm: CBMSystem, batch: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """Each loss term of a training step: the model's children it reaches."""
    terms = cbm.compute_loss(cbm.forward_batch(batch, "train"), batch, "train")
    return {term: gradients(cbm, batch, term) for term in terms}


def test_a_loss_on_another_concept_key_or_without_a_concept_term_is_refused(batch) -> None:
    from losses.baselines import ClassificationLoss

    with pytest.raises(ValueError, match=r"batch\['attributes'\] but the System from batch\['concepts'\]"):
        system(concept_key="concepts", loss=ConceptBottleneckLoss(weight=1.0))  # the loss keeps "attributes"
    cbm = system(loss=ClassificationLoss())
    with pytest.raises(ValueError, match="no 'loss_concept': the bottleneck g would never learn the concepts"):
        cbm.compute_loss(cbm.forward_batch(batch, "train"), batch, "train")
    twin = system(loss=ClassificationLoss(), model_kwargs={"bottleneck": False})  # f reads no concepts: allowed
    assert set(twin.compute_loss(twin.forward_batch(batch, "train"), batch, "train")) == {"loss_task"}


def write_cub_attributes(cub_root: Path, lines: list[str], names: list[str]) -> None:
    """attributes/image_attribute_labels.txt (lines as given) and attributes.txt beside CUB_200_2011/."""
    folder = cub_root / "CUB_200_2011" / "attributes"
    folder.mkdir(exist_ok=True)
    (folder / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    (cub_root / "attributes.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(names)))


# The conftest CUB fixture's images (id, class, training image): ids 3 and 4 are class 0's training images, 1 and 8
# class 1's, 2 class 2's; 5, 7, 6 are test images.
CUB_IMAGES = [(image_id, n % 3, n < 5) for n, image_id in enumerate([3, 1, 2, 4, 8, 5, 7, 6])]


def test_cub_attributes_follow_koh_et_al_certainty_and_tie_rule(cub_root: Path) -> None:
    """Koh et al.'s CUB voting (generate_new_data.py): per class over the training images, an "absent" label of
    certainty 1 (not visible) is not counted, and ties count as present. Each attribute below has class 0's two
    training images (ids 3, 4) labelled (is_present, certainty); every other training label is absent and
    definite, every test label present and definite (never read). Lines: the release's 5 fields, split by any
    whitespace, some with extra fields."""
    class0 = {"seen_once": [(1, 3), (0, 1)],  # present 1 : absent not counted -> present (the old rate 0.5: absent)
              "tie": [(1, 3), (0, 3)],  # 1 : 1 -> present (the old strict majority: absent)
              "absent": [(0, 4), (0, 1)],  # 0 : 1 -> absent
              "never_seen": [(0, 1), (0, 1)],  # 0 : 0, a tie -> present (Koh's rule)
              "unsure_present": [(1, 1), (0, 4)]}  # a present label of certainty 1 counts: 1 : 1 -> present
    names = list(class0)
    lines = []
    for image_id, cls, train in CUB_IMAGES:
        for a, name in enumerate(names):
            present, certainty = class0[name][[3, 4].index(image_id)] if cls == 0 and train else (0, 4) if train \
                else (1, 4)
            lines.append(f"{image_id} {a + 1} {present} {certainty} {12.5 + a}")
    lines[0] = lines[0].replace(" ", "  ") + " 0"  # doubled spaces and an extra field
    lines[1] = lines[1].replace(" ", "\t")
    write_cub_attributes(cub_root, lines, names)
    from datamodules import CUB200DataModule

    data = CUB200DataModule(root=str(cub_root), image_size=32, attributes=True, min_attribute_classes=1)
    assert data.attribute_names == ["seen_once", "tie", "never_seen", "unsure_present"]
    data.setup("fit")
    for split in ("train", "val"):
        for sample in data.splits[split]:
            expected = torch.full((4,), float(int(sample["label"]) == 0))
            assert torch.equal(sample["attributes"], expected), (split, int(sample["label"]))


def test_cub_attributes_are_voted_over_the_training_split_only(cub_root: Path) -> None:
    """With val_fraction, the held-out images' labels are not counted (Koh et al. vote over train.pkl, without
    their validation images): an attribute present only in a held-out image is absent from every class. (Counted,
    it would tie 1 : 1 with the other training image of its class, and a tie is present.)"""
    from datamodules import CUB200DataModule

    unlabelled = CUB200DataModule(root=str(cub_root), image_size=32, val_fraction=0.5, seed=4)
    unlabelled.setup("fit")
    rows = {split: unlabelled.splits[split].rows for split in ("train", "val")}
    held = unlabelled.index.image_ids[rows["val"]].tolist()
    assert held == [4] and sorted(unlabelled.index.labels[rows["train"]].tolist()) == [0, 1, 1, 2]  # id 4: class 0
    lines = [f"{image_id} 1 {int(image_id in held)} 4 1.0" for image_id, _, _ in CUB_IMAGES]
    lines += [f"{image_id} 2 1 4 1.0" for image_id, _, _ in CUB_IMAGES]  # everywhere: kept in every class
    write_cub_attributes(cub_root, lines, ["in_held_out_images", "everywhere"])
    data = CUB200DataModule(root=str(cub_root), image_size=32, val_fraction=0.5, seed=4, attributes=True,
                            min_attribute_classes=1)
    assert data.attribute_names == ["everywhere"]


def test_cub_attribute_values_outside_the_release_codes_name_the_file(cub_root: Path) -> None:
    from datamodules import CUB200DataModule, DatasetLayoutError

    write_cub_attributes(cub_root, [f"{image_id} 1 1 5 1.0" for image_id, _, _ in CUB_IMAGES], ["a"])
    with pytest.raises(DatasetLayoutError, match=r"certainty> 1..4 .*got '3 1 1 5'"):
        CUB200DataModule(root=str(cub_root), attributes=True)
    write_cub_attributes(cub_root, [f"{image_id} 1" for image_id, _, _ in CUB_IMAGES], ["a"])
    with pytest.raises(DatasetLayoutError, match="image_attribute_labels.txt:1: expected 4 fields"):
        CUB200DataModule(root=str(cub_root), attributes=True)


def test_intervention_ranks_by_uncertainty_and_several_random_orders() -> None:
    from zoo.cbm.intervene import intervention_ranks

    logits = torch.tensor([[3.0, -0.1, 1.0], [0.2, -5.0, 0.5]])
    torch.testing.assert_close(intervention_ranks(logits, "uncertainty"), torch.tensor([[[2, 0, 1], [0, 2, 1]]]))
    ranks = intervention_ranks(logits, "random", seed=4, trials=3)  # (T, 1, K): one order per trial
    generator = torch.Generator().manual_seed(4)
    for rank in ranks:
        assert torch.equal(rank[0].argsort(), torch.randperm(3, generator=generator))
    with pytest.raises(ValueError, match="order must be one of"):
        intervention_ranks(logits, "entropy")
    with pytest.raises(ValueError, match="trials averages random orders"):
        intervention_ranks(logits, "uncertainty", trials=5)


def test_intervention_curve_by_uncertainty_and_mean_over_random_orders() -> None:
    """"uncertainty": each image corrects its own least certain concepts first; trials: the mean curve over that
    many random orders, trial 0 being the single-order curve of the same seed."""
    from datamodules.parts_world import make_world
    from zoo.cbm.intervene import intervention_ranks

    world = make_world(6, 3, world_seed=0)
    model = label_function_model(world.part_types)
    labels = torch.arange(60) % 6
    concepts = torch.zeros(60, NUM_CONCEPTS).scatter_(1, world.part_types[labels], 1.0)
    logits = torch.randn(60, NUM_CONCEPTS, generator=torch.Generator().manual_seed(1))
    encoded = {"concept_logits": logits}
    by_uncertainty = intervention_curve(model, encoded, concepts, labels, ks=[0, 4, 36], values="hard",
                                        order="uncertainty")
    first4 = torch.zeros_like(concepts, dtype=torch.bool).scatter_(1, logits.abs().argsort(1)[:, :4], True)
    expected = (model.decode(encoded, concepts, first4)["logits"].argmax(-1) == labels).float().mean()
    assert by_uncertainty["acc"][1] == pytest.approx(float(expected)) and by_uncertainty["acc"][2] == 1.0
    assert by_uncertainty["order"] is None  # one order per image
    single = [intervention_curve(model, encoded, concepts, labels, seed=s, values="hard")["acc"] for s in (7,)]
    mean = intervention_curve(model, encoded, concepts, labels, seed=7, values="hard", trials=3)
    ranks = intervention_ranks(logits, "random", seed=7, trials=3)
    per_trial = torch.tensor([[float((model.decode(encoded, concepts, (rank < k).expand_as(concepts))["logits"]
                                      .argmax(-1) == labels).float().mean()) for k in range(NUM_CONCEPTS + 1)]
                              for rank in ranks])  # (T, K + 1)
    torch.testing.assert_close(torch.tensor(mean["acc"]), per_trial.mean(0))
    assert per_trial[0].tolist() == pytest.approx(single[0]) and mean["trials"] == 3 and mean["order"] is None


class SpyCurve:
    """Stands in for `intervention_curve` in the callback: records the keyword arguments, returns a flat curve."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, model, encoded, concepts, labels, ks, seed, values, **kwargs) -> dict:
        self.calls.append({"values": values, **kwargs})
        return {"k": list(ks), "acc": [0.5] * len(ks), "order": list(range(concepts.shape[1])), "trials": 1}


def fit_tiny(cbm: CBMSystem, callbacks: list[pl.Callback], folder: Path, max_epochs: int = 1) -> pl.Trainer:
    """One training batch and a 32-image validation of the parts world, with a CSV run folder under `folder`."""
    from pytorch_lightning.loggers import CSVLogger

    from datamodules import PartsWorldDataModule

    data = PartsWorldDataModule(num_classes=NUM_CLASSES, num_train=32, num_val=32, num_test=16, batch_size=16,
                                image_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, limit_train_batches=1, num_sanity_val_steps=0,
                         logger=CSVLogger(folder, name="run"), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(cbm, datamodule=data)
    return trainer


@pytest.mark.parametrize("mode, model_name, expected", [("independent", "cbm_tinycnn", "hard"),
                                                        ("joint", "cbm_tinycnn", "percentile"),
                                                        ("joint", "cem_tinycnn", "hard")])
def test_intervention_values_default_to_hard_for_independent_models(mode: str, model_name: str, expected: str,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Koh et al.'s tti.py corrects a model whose f was trained on the true 0/1 concepts with 0/1 (the independent
    model); percentiles stay the default of joint / sequential CBMs, 0/1 of CEM."""
    from zoo.cbm import callback
    from zoo.cbm.callback import InterventionCallback

    spy = SpyCurve()
    monkeypatch.setattr(callback, "intervention_curve", spy)
    fit_tiny(system(model_name=model_name, mode=mode, model_kwargs={"num_concepts": NUM_CONCEPTS}),
             [InterventionCallback()], tmp_path)
    assert [call["values"] for call in spy.calls] == [expected]


def test_intervention_callback_passes_its_order_and_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo.cbm import callback
    from zoo.cbm.callback import InterventionCallback

    spy = SpyCurve()
    monkeypatch.setattr(callback, "intervention_curve", spy)
    fit_tiny(system(), [InterventionCallback(order="uncertainty"), InterventionCallback(values="hard", trials=5)],
             tmp_path)
    assert spy.calls == [{"values": "percentile", "order": "uncertainty", "trials": 1, "groups": None},
                         {"values": "hard", "order": "random", "trials": 5, "groups": None}]
    with pytest.raises(ValueError, match="trials averages random orders"):
        InterventionCallback(order="uncertainty", trials=5)
    with pytest.raises(ValueError, match="order must be one of"):
        InterventionCallback(order="entropy")


def test_the_standard_twin_gets_no_intervention_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo.cbm import callback
    from zoo.cbm.callback import InterventionCallback

    spy, intervention = SpyCurve(), InterventionCallback()
    monkeypatch.setattr(callback, "intervention_curve", spy)
    trainer = fit_tiny(system(model_kwargs={"bottleneck": False}), [intervention], tmp_path)
    assert spy.calls == [] and intervention.curves == {}
    assert not (Path(trainer.log_dir) / "intervention").exists()


def test_concept_auroc_is_logged_and_each_concept_gets_its_f1_and_auroc(tmp_path: Path) -> None:
    from zoo.cbm.callback import ConceptsCallback

    trainer = fit_tiny(system(), [ConceptsCallback(num_images=4)], tmp_path)
    assert 0.0 <= float(trainer.callback_metrics["val/concept_auroc"]) <= 1.0
    table = (Path(trainer.log_dir) / "concepts" / "epoch0.md").read_text()
    assert "| image |" in table and "\n| concept | F1 | AUROC |\n| --- | --- | --- |\n" in table
    rows = table.split("| concept | F1 | AUROC |\n| --- | --- | --- |\n")[1].splitlines()
    assert len(rows) == NUM_CONCEPTS and rows[0].startswith("| red circle | ")  # the parts world's names
    assert all(len(row.split("|")) == 5 for row in rows)


def test_concept_auroc_matches_torchmetrics_and_leaves_out_single_valued_concepts() -> None:
    from torchmetrics.functional.classification import multilabel_auroc

    from zoo.cbm.metrics import ConceptAUROC

    generator = torch.Generator().manual_seed(0)
    logits, truth = torch.randn(40, 5, generator=generator), (torch.rand(40, 5, generator=generator) < 0.4).long()
    truth[:, 3], truth[:, 4] = 0, 1  # never present, always present: no AUROC
    metric = ConceptAUROC(5)
    metric.update(logits[:25], truth[:25])
    metric.update(logits[25:], truth[25:])
    reference = multilabel_auroc(logits, truth, 5, average="none")
    per_concept = metric.per_concept()
    torch.testing.assert_close(per_concept[:3], reference[:3])
    assert torch.isnan(per_concept[3:]).all()
    assert metric.compute() == pytest.approx(float(reference[:3].mean()))
    assert ConceptAUROC.higher_is_better


def soft(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    attributes = batch["attributes"].clone()
    attributes[2, 5] = 0.75  # CUB's "probably present", as Koh et al.'s uncertain labels
    return {**batch, "attributes": attributes}


class OnAccelerator(torch.Tensor):
    """A CPU tensor that reports an accelerator device: the System's training path for a GPU batch, on the CPU."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def test_soft_concept_labels_are_clear_errors(batch: dict[str, torch.Tensor]) -> None:
    """Values other than 0/1 would be read as present by interventions and metrics while the BCE trains towards
    them: refused on the host at once, and for a training batch on an accelerator at the engine's next check
    (no synchronisation inside the step)."""
    cbm = system()
    for stage in ("train", "val"):
        with pytest.raises(ValueError, match=r"batch\['attributes'\] must hold hard concept labels.*sample 2, "
                                             r"concept 5 is 0.75"):
            cbm.forward_batch(soft(batch), stage)
    on_gpu = {**batch, "attributes": soft(batch)["attributes"].as_subclass(OnAccelerator)}
    assert cbm.concepts(on_gpu, "train") is on_gpu["attributes"]  # no device read inside the step
    with pytest.raises(ValueError, match="the train batch at global step 0, epoch 0 held other values"):
        cbm.check_finite_losses()  # the engine's deferred checks
    clean = {**batch, "attributes": batch["attributes"].as_subclass(OnAccelerator)}
    cbm.concepts(clean, "val")
    cbm.check_finite_losses()  # 0/1: no error
    with pytest.raises(ValueError, match="must hold hard concept labels"):
        replacement_values(torch.randn(6, NUM_CONCEPTS), soft(batch)["attributes"], "percentile")
    with pytest.raises(ValueError, match="must hold hard concept labels"):
        ConceptAccuracy().update(torch.randn(6, NUM_CONCEPTS), soft(batch)["attributes"])


def test_independent_train_acc_scores_f_on_the_predicted_concepts(batch: dict[str, torch.Tensor]) -> None:
    """f is trained on the true concepts, but train/acc (as val/acc) scores it on g's predictions."""
    cbm = system(mode="independent")
    truth = torch.zeros(6, NUM_CONCEPTS).scatter_(1, batch["label"][:, None], 1.0)  # concept c: the label is c
    with torch.no_grad():
        cbm.model.task_head.weight.zero_()
        cbm.model.task_head.weight[:, :NUM_CLASSES] = 10 * torch.eye(NUM_CLASSES)
        cbm.model.task_head.bias.zero_()
    labelled = {**batch, "attributes": truth}
    out = cbm.forward_batch(labelled, "train")
    assert (out["logits"].argmax(-1) == batch["label"]).all()  # f on the truth: always right
    on_predictions = (cbm.model(batch["image"])["logits"].argmax(-1) == batch["label"]).float().mean()
    assert on_predictions < 1
    cbm.update_metrics(out, labelled, "train")
    assert cbm.metrics["train_acc"].compute() == pytest.approx(float(on_predictions))
    assert "logits_predicted" not in cbm.forward_batch(labelled, "val")  # evaluation: f reads g already


def test_intervention_report_says_how_concepts_were_corrected(tmp_path: Path) -> None:
    from zoo.cbm.intervene import write_intervention_report

    curve = {"k": [0, 1, 2], "acc": [0.5, 0.75, 1.0], "order": None, "trials": 3, "values": "hard",
             "order_by": "random"}
    markdown, _ = write_intervention_report(curve, tmp_path, "val", ["red", "blue"])
    assert markdown.startswith("Corrected concepts set to 0 / 1; the mean over 3 random orders.\n")
    assert "| 1 | 0.7500 | - |" in markdown and (tmp_path / "val.png").is_file()
    curve |= {"order": [1, 0], "trials": 1, "values": "percentile"}
    markdown, _ = write_intervention_report(curve, tmp_path, "val", ["red", "blue"])
    assert "percentile logits; one random order." in markdown and "| 1 | 0.7500 | blue |" in markdown


def test_concept_groups_take_the_cub_attribute_name_before_the_double_colon() -> None:
    """Koh et al.'s 28 CUB groups: "has_bill_shape::dagger" belongs to "has_bill_shape"; a name without "::" is its
    own group; ids follow first appearance, and a group's concepts need not be adjacent."""
    from zoo.cbm.intervene import concept_groups

    names = ["has_bill_shape::dagger", "has_bill_shape::hooked_seabird", "has_wing_color::blue",
             "has_size::small_(5_-_9_in)", "has_bill_shape::cone", "red ring", "has_wing_color::brown",
             "red ring::x::y"]
    groups, group_names = concept_groups(names)
    assert groups.dtype == torch.long and groups.tolist() == [0, 0, 1, 2, 0, 3, 1, 3]
    assert group_names == ["has_bill_shape", "has_wing_color", "has_size", "red ring"]
    assert concept_groups(["a", "b"])[0].tolist() == [0, 1] and concept_groups([])[1] == []


def grouped_world() -> tuple[zoo.cbm.model.ConceptBottleneckModel, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """4 concepts, groups A = {0, 2} and B = {1, 3}; class 1 iff the concept probabilities sum above 2.5. Images:
    a (both groups fix it), b (A only), d (B only), e (always right), f (A only); wrong at k = 0 but e."""
    model = zoo.create_model("cbm_tinycnn", num_classes=2, num_concepts=4).eval()
    with torch.no_grad():
        model.task_head.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1]]))
        model.task_head.bias.copy_(torch.tensor([2.5, 0.0]))
    concepts = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 0, 0]])  # a b d e f
    logits = torch.tensor([[-4.0, -4, 4, 4], [-4, 4, -4, -4], [-4, 4, 4, -4], [4, 4, 4, 4], [4, 4, 4, -4]])
    return model, {"concept_logits": logits}, concepts, torch.tensor([1, 1, 1, 1, 0])


def test_intervention_by_groups_corrects_a_whole_group_per_step() -> None:
    """k = 1 corrects both concepts of the first group: 4 / 5 right when it is A (a, b, e, f), 3 / 5 when B (a, d,
    e); k counts groups (0 .. 2) and the order names groups, drawn as a permutation of the 2 groups."""
    from zoo.cbm.intervene import intervention_ranks

    model, encoded, concepts, labels = grouped_world()
    groups = torch.tensor([0, 1, 0, 1])
    expected = {0: [0.2, 0.8, 1.0], 1: [0.2, 0.6, 1.0]}  # by the group corrected first
    firsts = set()
    for seed in range(6):
        curve = intervention_curve(model, encoded, concepts, labels, seed=seed, values="hard", groups=groups)
        first = int(torch.randperm(2, generator=torch.Generator().manual_seed(seed))[0])
        assert curve["order"][0] == first and sorted(curve["order"]) == [0, 1]
        assert curve["k"] == [0, 1, 2] and curve["groups"] == 2 and curve["acc"] == pytest.approx(expected[first])
        ranks = intervention_ranks(encoded["concept_logits"], seed=seed, groups=groups)  # (1, 1, K)
        assert ranks[0, 0].tolist() == ([0, 1, 0, 1] if first == 0 else [1, 0, 1, 0])
        firsts.add(first)
    assert firsts == {0, 1}
    ungrouped = intervention_curve(model, encoded, concepts, labels, seed=0, values="hard")
    assert ungrouped["k"] == [0, 1, 2, 3, 4] and ungrouped["groups"] is None


def test_intervention_without_groups_is_the_per_concept_curve_bit_for_bit() -> None:
    """groups=None (and one group per concept) give the per-concept ranks and curve: the seed's permutation of the K
    concepts, or |logit| ascending per image."""
    from datamodules.parts_world import make_world
    from zoo.cbm.intervene import intervention_ranks

    world = make_world(6, 3, world_seed=0)
    model = label_function_model(world.part_types)
    labels = torch.arange(60) % 6
    concepts = torch.zeros(60, NUM_CONCEPTS).scatter_(1, world.part_types[labels], 1.0)
    logits = torch.randn(60, NUM_CONCEPTS, generator=torch.Generator().manual_seed(1))
    logits[0, :3] = torch.tensor([0.5, -0.5, 0.5])  # ties keep concept order
    encoded = {"concept_logits": logits}
    orders = {"random": torch.randperm(NUM_CONCEPTS, generator=torch.Generator().manual_seed(5))[None, None],
              "uncertainty": logits.abs().argsort(dim=1, stable=True)[None]}
    for order, concept_order in orders.items():
        old = torch.empty_like(concept_order).scatter_(-1, concept_order, torch.arange(NUM_CONCEPTS).expand_as(
            concept_order))  # (1, 1 or N, K)
        for groups in (None, torch.arange(NUM_CONCEPTS)):
            assert torch.equal(intervention_ranks(logits, order, seed=5, groups=groups), old)
            curve = intervention_curve(model, encoded, concepts, labels, seed=5, order=order, groups=groups)
            assert curve["acc"] == [float((model.decode(encoded, replacement_values(logits, concepts),
                                                        (old[0] < k).expand_as(concepts))["logits"].argmax(-1)
                                           == labels).float().mean()) for k in range(NUM_CONCEPTS + 1)]
            assert curve["order"] == (concept_order[0, 0].tolist() if order == "random" else None)


def test_intervention_by_groups_ranks_uncertainty_by_the_groups_mean_abs_logit() -> None:
    """Per image, the group whose concepts' mean |logit| is smallest first (not the single least certain concept);
    ties keep group order; bad group ids are clear errors."""
    from zoo.cbm.intervene import intervention_ranks

    groups = torch.tensor([0, 1, 0, 1, 2])
    logits = torch.tensor([[0.1, 1.0, 3.0, -1.0, 9.0],  # means 1.55, 1.0, 9.0: B, A, C
                           [0.5, -4.0, -0.5, 2.0, 0.2],  # 0.5, 3.0, 0.2: C, A, B
                           [1.0, 2.0, -1.0, 0.0, 1.0]])  # 1.0, 1.0, 1.0: A, B, C
    ranks = intervention_ranks(logits, "uncertainty", groups=groups)  # (1, N, K)
    assert ranks.tolist() == [[[1, 0, 1, 0, 2], [1, 2, 1, 2, 0], [0, 1, 0, 1, 2]]]
    model, encoded, concepts, labels = grouped_world()
    encoded["concept_logits"] = encoded["concept_logits"] / torch.tensor([[4.0, 1, 4, 1], [1, 4, 1, 4], [4, 1, 4, 1],
                                                                          [1, 1, 1, 1], [1, 4, 1, 4]])  # A B A A B
    curve = intervention_curve(model, encoded, concepts, labels, values="hard", order="uncertainty",
                               groups=torch.tensor([0, 1, 0, 1]))
    first = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    expected = (model.decode(encoded, concepts, first)["logits"].argmax(-1) == labels).float().mean()  # by hand:
    assert curve["acc"] == pytest.approx([0.2, float(expected), 1.0]) and float(expected) == pytest.approx(0.4)  # a, e
    assert curve["order"] is None
    for bad in (torch.tensor([0, 2, 0, 2, 0]), torch.tensor([0, 1, 0]), torch.tensor([0.0, 1, 0, 1, 0])):
        with pytest.raises(ValueError, match="groups must be"):
            intervention_ranks(logits, groups=bad)


def test_intervention_callback_by_groups_reports_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """by_groups: the datamodule's concept names grouped by "::" (here 36 names in 9 groups of 4), k = 0 .. 9, the
    table and picture in groups."""
    from zoo.cbm import callback
    from zoo.cbm.callback import InterventionCallback

    monkeypatch.setattr(callback, "concept_names", lambda trainer, k: [f"part{i // 4}::{i}" for i in range(k)])
    grouped, plain = InterventionCallback(by_groups=True), InterventionCallback(seed=1)
    trainer = fit_tiny(system(), [grouped, plain], tmp_path)
    curve = grouped.curves["val"]
    assert curve["k"] == list(range(10)) and curve["groups"] == 9 and sorted(curve["order"]) == list(range(9))
    assert plain.curves["val"]["k"] == list(range(NUM_CONCEPTS + 1)) and plain.curves["val"]["groups"] is None
    markdown = (Path(trainer.log_dir) / "intervention" / "val.md").read_text()  # the last callback's: plain
    assert "| k | task accuracy | concept corrected k-th |" in markdown
    report, _ = callback.write_intervention_report(curve, tmp_path, "grouped", [f"part{g}" for g in range(9)])
    assert "k counts groups of concepts (9), each corrected whole." in report
    assert "| k | task accuracy | group corrected k-th |" in report
    assert f"| 1 | {curve['acc'][1]:.4f} | part{curve['order'][0]} |" in report


def test_a_checkpoint_of_another_training_mode_is_refused_on_resume(batch: dict[str, torch.Tensor]) -> None:
    """A joint checkpoint resumed by a sequential run (`--ckpt_path last`: the run's config; `fit --ckpt_path FILE`:
    Lightning would copy the checkpoint's mode over the config) trained one mode and recorded another: refused by
    name. `test` / `predict --ckpt_path FILE` take the checkpoint's mode, as before."""
    from jsonargparse import Namespace

    from zoo import CheckpointError
    from zoo.weights import check_config_fits_checkpoint

    joint = system()
    checkpoint = {"hyper_parameters": {**joint.hparams, "_class_path": "zoo.cbm.system.CBMSystem"},
                  "state_dict": joint.state_dict()}
    sequential = system(mode="sequential", stages=SEQUENTIAL_STAGES)
    with pytest.raises(CheckpointError, match="trained with mode='joint'; this run has mode='sequential'"):
        sequential.on_load_checkpoint(checkpoint)
    system().on_load_checkpoint(checkpoint)  # the same mode: no error
    config = Namespace(class_path="zoo.cbm.system.CBMSystem",
                       init_args=Namespace(model_name="cbm_tinycnn", mode="sequential", concept_key="attributes"))
    with pytest.raises(CheckpointError, match="mode='joint'"):
        check_config_fits_checkpoint(config, checkpoint, "--ckpt_path 'x.ckpt'", resuming=True)
    check_config_fits_checkpoint(config, checkpoint, "--ckpt_path 'x.ckpt'")  # test / predict


def test_a_budget_that_ends_inside_an_earlier_stage_is_named() -> None:
    """Sequential with max_epochs=2 and a 4-epoch concept stage would never train f (the intervention curve flat at
    chance, the report looking finished): the fit says which stages and modules the budget never reaches."""
    from datamodules import PartsWorldDataModule

    data = PartsWorldDataModule(num_classes=12, num_train=16, num_val=8, num_test=8, batch_size=8)
    stages = [{**SEQUENTIAL_STAGES[0], "epochs": 4}, {**SEQUENTIAL_STAGES[1], "epochs": 2}]
    cbm = CBMSystem(model_name="cbm_tinycnn", num_classes=data.num_classes, image_size=data.image_size,
                    mode="sequential", stages=stages)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match=r"max_epochs=2 ends before stage\(s\) \['task'\].*\['task_head'\] are "
                                         r"never trained") as record:
        trainer.fit(cbm, datamodule=data)
    assert sum("ends before stage" in str(w.message) for w in record) == 1  # said once, not every epoch
    trainer = pl.Trainer(max_epochs=6, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ends before stage")
        trainer.fit(CBMSystem(model_name="cbm_tinycnn", num_classes=data.num_classes, image_size=data.image_size,
                              mode="sequential", stages=stages), datamodule=data)


def test_a_stage_equal_to_an_unreached_one_still_counts_as_trained() -> None:
    """Two identical cycles (ProtoPNet's cub200.yaml repeats its push cycle) cut after the first: the budget skips
    the second cycle's task stage, but the first one trained task_head, which must not be named as never trained
    (stages compared by value counted the first as unreached too)."""
    from datamodules import PartsWorldDataModule

    data = PartsWorldDataModule(num_classes=12, num_train=16, num_val=8, num_test=8, batch_size=8)
    stages = [{**stage, "epochs": 1} for stage in SEQUENTIAL_STAGES] * 2
    cbm = CBMSystem(model_name="cbm_tinycnn", num_classes=data.num_classes, image_size=data.image_size,
                    stages=stages)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match=r"max_epochs=3 ends before stage\(s\) \['task'\]") as record:
        trainer.fit(cbm, datamodule=data)
    assert not any("never trained" in str(w.message) for w in record)


def test_a_pos_weight_of_another_length_than_the_concepts_is_refused() -> None:
    """`pos_weight` weighs each concept's positives: a length neither 1 nor the model's concept count crashed in
    the sanity check with a broadcast error, after the run folder was written."""
    from losses.cbm import ConceptBottleneckLoss

    with pytest.raises(ValueError, match="pos_weight has 2 values but the model predicts 36 concepts"):
        CBMSystem(model_name="cbm_tinycnn", num_classes=6, loss=ConceptBottleneckLoss(pos_weight=[2.0, 3.0]))
    for pos_weight in ([2.0], [1.0] * 36):
        CBMSystem(model_name="cbm_tinycnn", num_classes=6, loss=ConceptBottleneckLoss(pos_weight=pos_weight))


def test_a_batch_without_the_concepts_names_the_field_and_the_cub_option(batch: dict[str, torch.Tensor]) -> None:
    without = {k: v for k, v in batch.items() if k != "attributes"}
    for stage in ("train", "val"):
        with pytest.raises(KeyError, match=r"no 'attributes' \(concept_key\).*attributes=true"):
            system().forward_batch(without, stage)
    assert system().concepts(without, "predict") is None


def test_a_single_concept_bottleneck_is_scored_like_any_other(batch: dict[str, torch.Tensor]) -> None:
    """K = 1 is a valid bottleneck (the model takes it); its AUROC is the binary AUROC of that concept."""
    from torchmetrics.functional.classification import binary_auroc

    one = system(model_kwargs={"num_concepts": 1})
    single = {**batch, "attributes": batch["attributes"][:, :1].clone()}
    single["attributes"][:2] = torch.tensor([[0.0], [1.0]])  # both values present
    out = one.forward_batch(single, "val")
    one.update_metrics(out, single, "val")
    expected = binary_auroc(out["concept_logits"][:, 0].detach(), single["attributes"][:, 0].long())
    assert torch.allclose(one.metrics["val_concept_auroc"].compute(), expected)


def test_train_intervention_without_effect_in_independent_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="no effect in mode='independent'"):
        system(mode="independent", train_intervention=0.5)


def test_cub_attributes_of_which_none_is_kept_and_groups_without_names_are_named(cub_root: Path, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    from datamodules import CUB200DataModule, DatasetLayoutError
    from zoo.cbm import callback
    from zoo.cbm.callback import InterventionCallback

    base = cub_root / "CUB_200_2011"
    (base / "attributes").mkdir()
    (base / "attributes" / "image_attribute_labels.txt").write_text(
        "".join(f"{image_id} 1 1 4 1.0\n" for image_id in range(1, 9)))
    with pytest.raises(DatasetLayoutError, match="min_attribute_classes=10 of the 3 classes"):
        CUB200DataModule(root=str(cub_root), image_size=32, attributes=True).setup("fit")
    monkeypatch.setattr(callback, "concept_names", lambda trainer, k: [f"attribute {i + 1}" for i in range(k)])
    with pytest.warns(UserWarning, match="no concept name has a '<group>::<value>' prefix") as record:
        fit_tiny(system(), [InterventionCallback(by_groups=True)], tmp_path, max_epochs=2)
    assert sum("::<value>' prefix" in str(w.message) for w in record) == 1


def test_predict_writes_each_images_predicted_concepts(in_tmp_dir: Path) -> None:
    """predictions.csv names the concepts the bottleneck predicts present (probability >= 0.5): what f read."""
    import csv

    from train import main

    main(["fit", "--config", str(REPO / "configs/cbm/parts_world.yaml"), "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
          "--trainer.logger.init_args.name=run", "--trainer.callbacks=null", *SMALL_WORLD])
    run = in_tmp_dir / "checkpoints" / "run"
    main(["predict", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
          "--trainer.limit_predict_batches=1"])
    with (run / "predictions" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    model = zoo.load_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    from datamodules import PartsWorldDataModule

    data = PartsWorldDataModule(**{**yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]})
    data.setup("test")
    images = torch.stack([data.splits["test"][i]["image"] for i in range(len(rows))])
    with torch.no_grad():
        present = model(images)["concept_probs"] >= 0.5  # (N, K)
    assert rows and "concepts" in rows[0]
    for row, on in zip(rows, present):
        named = row["concepts"].split("; ") if row["concepts"] else []
        assert named == [data.attribute_names[k] for k in on.nonzero().flatten().tolist()]
    assert any(row["concepts"] for row in rows)


def test_the_readmes_intervention_call_corrects_the_named_concepts_only() -> None:
    definition = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    model = label_function_model(definition)
    images = torch.rand(4, 3, 32, 32)
    true_concepts = torch.zeros(4, NUM_CONCEPTS).scatter_(1, definition, 1.0)  # image i shows class i's parts
    fix = torch.zeros_like(true_concepts, dtype=torch.bool)
    fix[:, :12] = True
    out = model(images, concepts=true_concepts, intervene=fix)
    assert torch.equal(out["concept_probs"][:, :12], true_concepts[:, :12])
    assert torch.equal(out["concept_probs"][:, 12:], out["concept_logits"].sigmoid()[:, 12:])
    with pytest.raises(ValueError, match="needs both `concepts`"):
        model(images, concepts=true_concepts)  # silently ignored before
    with pytest.raises(ValueError, match="must be a bool"):
        model(images, concepts=true_concepts, intervene=fix.float())


def test_a_model_with_another_concept_count_than_the_data_is_refused_at_setup(cub_root: Path) -> None:
    """CUB with attributes=true gives as many concepts as its filter keeps (here 2); a CBM still at the parts
    world's 36 is refused when the run is set up (a DataSettingError naming model_kwargs.num_concepts and both
    counts: train.py says it in one line), not with a traceback at the first validation batch."""
    from types import SimpleNamespace

    from datamodules import CUB200DataModule, DataSettingError

    lines = [f"{image_id} {a} 1 4 1.0" for image_id, _, _ in CUB_IMAGES for a in (1, 2)]
    write_cub_attributes(cub_root, lines, ["has_wing_color::brown", "has_bill_shape::cone"])
    data = CUB200DataModule(root=str(cub_root), image_size=32, batch_size=4, attributes=True, min_attribute_classes=1)
    assert len(data.attribute_names) == 2
    trainer = pl.Trainer(accelerator="cpu", limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(DataSettingError, match=r"num_concepts=36 .*len\(attribute_names\).* is 2\. Set "
                                               r"model_kwargs.num_concepts to 2"):
        trainer.validate(CBMSystem(num_classes=3, image_size=32), datamodule=data, verbose=False)
    matching = CBMSystem(num_classes=3, image_size=32, model_kwargs={"num_concepts": 2})
    trainer.validate(matching, datamodule=data, verbose=False)  # the same data, the right count: runs
    # a datamodule's num_concepts / concept_names count; attribute_names only for the `attributes` field
    for told, concept_key, refused in [({"num_concepts": 5}, "attributes", True),
                                       ({"concept_names": ["a", "b"]}, "attributes", True),
                                       ({"attribute_names": ["a"]}, "parts", False),
                                       ({"attribute_names": []}, "attributes", False)]:
        cbm = CBMSystem(num_classes=3, concept_key=concept_key, model_kwargs={"num_concepts": 3},
                        loss=ConceptBottleneckLoss(concept_key=concept_key))
        if refused:
            with pytest.raises(DataSettingError, match="model_kwargs.num_concepts"):
                cbm.check_concept_count(SimpleNamespace(**told))
        else:
            cbm.check_concept_count(SimpleNamespace(**told))


def test_the_intervention_curve_leaves_a_frozen_concept_model_in_eval_mode(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequential CBM ends its fit in the task stage, its concept model f frozen in eval mode. The curve at fit end
    restored only the model's top flag (`model.train(was_training)`): f came back training, and a fit going on
    (or a step run by hand) updated its BatchNorm statistics. Every module keeps its own mode (`eval_mode`)."""
    from zoo.cbm import callback
    from zoo.cbm.callback import InterventionCallback

    monkeypatch.setattr(callback, "intervention_curve", SpyCurve())
    stages = [{"name": "concepts", "epochs": 1, "train": ["backbone", "concept_head"], "losses": ["loss_concept"]},
              {"name": "task", "epochs": 1, "train": ["task_head"], "losses": ["loss_task"]}]
    cbm = system(mode="sequential", stages=stages)
    fit_tiny(cbm, [InterventionCallback()], tmp_path, max_epochs=2)
    assert cbm.model.training and cbm.model.task_head.training
    assert not cbm.model.backbone.training and not cbm.model.concept_head.training

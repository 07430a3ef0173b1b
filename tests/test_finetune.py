"""Fine-tuning basics: command-line model_kwargs merge with the config's, input normalisation (given or from the
backbone's timm pretrained config), freeze_backbone / unfreeze_epoch / backbone_lr_scale (with stages and resume),
and class names from the data to the checkpoint and the export."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import zoo
from datamodules import ImageFolderDataModule, PartsWorldDataModule
from tests.conftest import REPO
from zoo.baselines.system import ClassifierSystem
from zoo.cli.lightning import ZooCLI, merge_kwargs_options
from zoo.engine.system import backbone_of

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SMALL_WORLD = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
               "--trainer.logger=false"]


def cli(*args: str) -> ZooCLI:
    return ZooCLI(args=list(args), run=False)


# ------------------------------------------------------------------------------------------ model_kwargs merge
def test_command_line_model_kwargs_merge_with_the_config_instead_of_replacing_them(in_tmp_dir: Path) -> None:
    config = str(REPO / "configs/icnn/parts_world.yaml")  # model_kwargs: {tau_scale: 16.0, category_assignment: ...}
    merged = cli("--config", config, "--model.init_args.model_kwargs", "{drop_rate: 0.25}", *SMALL_WORLD)
    assert merged.model.hparams.model_kwargs == {"tau_scale": 16.0, "category_assignment": "balanced",
                                                 "drop_rate": 0.25}
    assert merged.model.model.head.drop.p == 0.25 and merged.model.model.top_filters.category_assignment == "balanced"
    equals_form = cli("--config", config, "--model.init_args.model_kwargs={drop_rate: 0.25, tau_scale: 2.0}",
                      *SMALL_WORLD)
    assert equals_form.model.hparams.model_kwargs == {"tau_scale": 2.0, "category_assignment": "balanced",
                                                      "drop_rate": 0.25}
    replaced = cli("--config", config, "--model.init_args.model_kwargs=null", "--model.init_args.model_kwargs",
                   "{drop_rate: 0.25}", *SMALL_WORLD)  # null first: a deliberate replacement
    assert replaced.model.hparams.model_kwargs == {"drop_rate": 0.25}
    unset = cli("--config", config, "--model.init_args.model_kwargs.tau_scale=null", *SMALL_WORLD)  # default again
    assert unset.model.hparams.model_kwargs == {"tau_scale": None, "category_assignment": "balanced"}
    default = zoo.create_model("icnn_tinycnn", num_classes=6, image_size=64)  # tau_scale 1: the factory's default
    assert torch.equal(unset.model.model.top_filters.bank, default.top_filters.bank)
    assert not torch.equal(merged.model.model.top_filters.bank, default.top_filters.bank)


def test_merge_kwargs_options_rewrites_only_mappings() -> None:
    assert merge_kwargs_options(["fit", "--model.init_args.model_kwargs", "{pretrained_path: w.pt, masks: false}",
                                 "--model.init_args.black_box_kwargs=null", "--x", "{a: 1}"]) == [
        "fit", "--model.init_args.model_kwargs.pretrained_path=w.pt", "--model.init_args.model_kwargs.masks=false",
        "--model.init_args.black_box_kwargs", "null", "--x", "{a: 1}"]


# ---------------------------------------------------------------------------------------------- normalisation
def test_normalisation_given_or_taken_from_the_pretrained_config(image_folder_root: Path) -> None:
    raw = ImageFolderDataModule(str(image_folder_root), image_size=16)
    raw_images = next(iter(raw.val_dataloader()))["image"]
    assert raw.mean is None and 0 <= raw_images.min() and raw_images.max() <= 1  # None: today's [0, 1] pixels

    dm = ImageFolderDataModule(str(image_folder_root), image_size=16, mean="pretrained")
    with pytest.raises(ValueError, match="use_pretrained_normalization"):
        dm.val_dataloader()
    dm.use_pretrained_normalization("resnet18")  # timm's pretrained_cfg, no download
    assert dm.mean == pytest.approx(IMAGENET_MEAN) and dm.std == pytest.approx(IMAGENET_STD)
    images = next(iter(dm.val_dataloader()))["image"]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(images, (raw_images - mean) / std)
    torch.testing.assert_close(dm.denormalize(images), raw_images)
    assert torch.equal(dm.splits["val"][0]["image"], raw_images[0])  # the splits keep the raw images

    given = ImageFolderDataModule(str(image_folder_root), image_size=16, mean=[0.5], std=[0.25])
    torch.testing.assert_close(next(iter(given.val_dataloader()))["image"], (raw_images - 0.5) / 0.25)
    for mean, std, message in (([0.5], None, "both"), ([0.5, 0.5], [1.0, 1.0], "1 or 3"),
                               ("pretrained", [0.2], "std from the backbone"),
                               ("imagenet", None, "lists of per-channel values, or mean: pretrained")):
        with pytest.raises(ValueError, match=message):
            ImageFolderDataModule(str(image_folder_root), mean=mean, std=std)
    with pytest.raises(ValueError, match="no timm pretrained config"):
        ImageFolderDataModule(str(image_folder_root), mean="pretrained").use_pretrained_normalization("tinycnn")


def test_the_cli_takes_mean_pretrained_from_the_models_backbone(image_folder_root: Path, in_tmp_dir: Path) -> None:
    config = str(REPO / "configs/baselines/image_folder.yaml")  # baseline_resnet18
    run = cli("--config", config, f"--data.init_args.root={image_folder_root}", "--data.init_args.mean=pretrained",
              "--trainer.logger=false")
    assert run.datamodule.mean == pytest.approx(IMAGENET_MEAN) and run.datamodule.std == pytest.approx(IMAGENET_STD)
    with pytest.raises(ValueError, match="no timm pretrained config"):
        cli("--config", config, f"--data.init_args.root={image_folder_root}", "--data.init_args.mean=pretrained",
            "--model.init_args.model_name=baseline_tinycnn", "--trainer.logger=false")


# ----------------------------------------------------------------------------------- freeze and learning rates
class RecordBackbone(pl.Callback):
    """Per training epoch: whether the backbone trains, its BatchNorm mode, and its weights at the epoch's end."""

    def __init__(self) -> None:
        self.requires_grad: dict[int, bool] = {}
        self.bn_training: dict[int, bool] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.lrs: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        backbone = backbone_of(pl_module.model)
        epoch = trainer.current_epoch
        self.requires_grad[epoch] = all(p.requires_grad for p in backbone.parameters())
        self.bn_training[epoch] = all(m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
        self.lrs[epoch] = [group["lr"] for group in trainer.optimizers[0].param_groups]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = backbone_of(pl_module.model).state_dict()
        self.weights[trainer.current_epoch] = torch.cat([v.flatten().float() for v in state.values()]).clone()


def fine_tuned_system(**kwargs) -> ClassifierSystem:
    return ClassifierSystem("baseline_tinycnn", num_classes=4, image_size=32, freeze_backbone=True, unfreeze_epoch=1,
                            backbone_lr_scale=0.1, optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                            **kwargs)


def small_world() -> PartsWorldDataModule:
    return PartsWorldDataModule(num_classes=4, image_size=32, num_train=16, num_val=8, num_test=8, batch_size=8)


def trainer(tmp_path: Path, epochs: int, record: RecordBackbone) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[record])


def test_freeze_backbone_then_unfreeze_with_its_own_learning_rate_survives_resume(tmp_path: Path) -> None:
    stages = [{"name": "warm", "epochs": 1}, {"name": "slow", "epochs": 1, "lr_scale": 0.5}]
    system, record = fine_tuned_system(stages=stages), RecordBackbone()
    before = torch.cat([v.flatten().float() for v in backbone_of(system.model).state_dict().values()]).clone()
    first = trainer(tmp_path, 1, record)
    first.fit(system, datamodule=small_world())
    groups = first.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["backbone", "rest"]
    assert len(groups[0]["params"]) == len(list(backbone_of(system.model).parameters()))
    assert record.lrs[0] == pytest.approx([0.01, 0.1])  # backbone_lr_scale 0.1
    assert not record.requires_grad[0] and not record.bn_training[0]  # frozen: no update, BatchNorm in eval
    torch.testing.assert_close(record.weights[0], before)  # weights and BatchNorm statistics untouched
    first.save_checkpoint(tmp_path / "epoch0.ckpt")

    resumed_system, resumed = fine_tuned_system(stages=stages), RecordBackbone()
    trainer(tmp_path, 2, resumed).fit(resumed_system, datamodule=small_world(), ckpt_path=tmp_path / "epoch0.ckpt")
    assert resumed.requires_grad[1] and resumed.bn_training[1]  # unfrozen from unfreeze_epoch
    assert resumed.lrs[1] == pytest.approx([0.005, 0.05])  # the stage's lr_scale on both groups, ratio kept
    assert not torch.allclose(resumed.weights[1], before)


def test_fine_tuning_options_need_a_model_with_a_backbone() -> None:
    from zoo.renn.system import ReNNSystem

    with pytest.raises(ValueError, match="has no `backbone` module"):
        ReNNSystem("renn_series", num_classes=4, in_chans=1, image_size=None, freeze_backbone=True)
    with pytest.raises(ValueError, match="needs freeze_backbone=True"):
        ClassifierSystem("baseline_tinycnn", num_classes=4, unfreeze_epoch=2)
    plain = ClassifierSystem("baseline_tinycnn", num_classes=4)
    assert len(plain.configure_optimizers().param_groups) == 1  # no option: one group, as before


def test_unfreezing_a_backbone_the_model_was_built_to_keep_frozen_is_refused() -> None:
    """`model_kwargs.freeze_backbone` freezes the backbone for the whole run; the System's `unfreeze_epoch` switched
    it back on at that epoch without a word (the two settings contradict each other: say so, naming both)."""
    with pytest.raises(ValueError, match=r"built with its backbone frozen.*unfreeze_epoch=2"):
        ClassifierSystem("baseline_tinycnn", num_classes=4, freeze_backbone=True, unfreeze_epoch=2,
                         model_kwargs={"freeze_backbone": True})
    held = ClassifierSystem("baseline_tinycnn", num_classes=4, freeze_backbone=True,  # both keep it frozen: fine
                            model_kwargs={"freeze_backbone": True})
    assert not any(p.requires_grad for p in backbone_of(held.model).parameters())


# ------------------------------------------------------------------------------------------------ class names
def test_class_names_travel_from_the_folder_to_the_checkpoint_and_the_export(image_folder_root: Path,
                                                                            in_tmp_dir: Path) -> None:
    from train import main

    run = main(["fit", "--config", str(REPO / "configs/baselines/image_folder.yaml"),
                f"--data.init_args.root={image_folder_root}", "--data.init_args.image_size=32",
                "--model.init_args.model_name=baseline_tinycnn", "--trainer.max_epochs=1",
                "--trainer.logger.init_args.name=names"])
    assert run.datamodule.class_names == ["cat", "dog"] and run.model.class_names == ["cat", "dog"]
    checkpoint = in_tmp_dir / "checkpoints" / "names" / "checkpoints" / "last.ckpt"
    assert zoo.load_checkpoint(checkpoint).class_names == ["cat", "dog"]
    assert ClassifierSystem.load_from_checkpoint(checkpoint).class_names == ["cat", "dog"]
    exported = zoo.export_checkpoint(checkpoint, in_tmp_dir / "export")
    assert zoo.load_exported(exported).class_names == ["cat", "dog"]
    with pytest.raises(ValueError, match="3 names for num_classes=2"):
        ClassifierSystem("baseline_tinycnn", num_classes=2, class_names=["a", "b", "c"])


@pytest.mark.parametrize("make, names", [
    (lambda: PartsWorldDataModule(num_classes=3), ["class 0", "class 1", "class 2"]),
    (lambda: __import__("datamodules").DigitsDataModule(classes=[3, 8]), ["3", "8"]),
    (lambda: __import__("datamodules").SyntheticSentimentDataModule(), ["negative", "positive"]),
    (lambda: __import__("datamodules").L2XSyntheticDataModule(), ["0", "1"]),
])
def test_every_datamodule_names_its_classes(make, names: list[str]) -> None:
    assert make().class_names == names


def test_real_datasets_name_their_classes_and_samples(cub_root: Path, image_folder_root: Path) -> None:
    from datamodules import CUB200DataModule

    cub = CUB200DataModule(str(cub_root), image_size=32)
    assert cub.class_names == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    sample = cub.split_samples("test")[0]
    assert cub.sample_names("test")[int(sample["index"])].startswith(cub.class_names[int(sample["label"])])
    folder = ImageFolderDataModule(str(image_folder_root))
    assert folder.class_names == ["cat", "dog"] and folder.sample_names("val")[2] == "val/dog/0.png"


def test_a_backbone_built_frozen_stays_frozen_in_a_stage_that_names_it(tmp_path: Path) -> None:
    """`model_kwargs.freeze_backbone` keeps the backbone's weights and BatchNorm statistics through every stage: a
    sequential CBM's concept stage trains [backbone, concept_head], which switched requires_grad back on (and BatchNorm
    to train mode) for the whole backbone; it trains what it names of what the model was built to train."""
    from zoo.cbm.system import CBMSystem

    stages = [{"name": "concepts", "epochs": 1, "train": ["backbone", "concept_head"], "losses": ["loss_concept"]},
              {"name": "task", "epochs": 1, "train": ["task_head"], "losses": ["loss_task"]}]
    torch.manual_seed(0)
    system = CBMSystem("cbm_tinycnn", num_classes=4, image_size=32, mode="sequential", stages=stages,
                       model_kwargs={"num_concepts": 36, "freeze_backbone": True},
                       optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    head = system.model.concept_head
    before = torch.cat([v.flatten().float() for v in backbone_of(system.model).state_dict().values()]).clone()
    head_before = torch.cat([p.flatten() for p in head.parameters()]).clone()
    record = RecordBackbone()
    trainer(tmp_path, 2, record).fit(system, datamodule=small_world())
    assert record.requires_grad == {0: False, 1: False} and record.bn_training == {0: False, 1: False}
    torch.testing.assert_close(record.weights[1], before)  # weights and BatchNorm running statistics untouched
    assert not torch.allclose(torch.cat([p.flatten() for p in head.parameters()]), head_before)  # the rest trains


@pytest.mark.parametrize("scheduler", [
    partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01, total_steps=8),
    partial(torch.optim.lr_scheduler.CyclicLR, base_lr=0.001, max_lr=0.01, step_size_up=2),
    partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=8),
    partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 0.9 ** step),
    lambda optimizer: torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, 0.5, total_iters=2),
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=8)], milestones=[2])],
    ids=["onecycle", "cyclic", "cosine", "lambda", "sequential"])
def test_backbone_lr_scale_holds_under_every_scheduler(scheduler) -> None:
    """OneCycleLR and CyclicLR set every group's rate from their one max_lr / base_lr as they are built: the
    backbone's 0.1 scale was undone (both groups at one rate, every step), silently."""
    system = fine_tuned_system(scheduler=scheduler)
    config = system.configure_optimizers()
    optimizer, built = config["optimizer"], config["lr_scheduler"]["scheduler"]
    ratios = []
    for _ in range(5):
        backbone, rest = (group["lr"] for group in optimizer.param_groups)
        ratios.append(backbone / rest)
        assert built.get_last_lr()[0] / built.get_last_lr()[1] == pytest.approx(0.1)
        optimizer.step()
        built.step()
    assert ratios == pytest.approx([0.1] * 5)


def test_an_unfreeze_epoch_the_fit_never_reaches_is_warned_of(tmp_path: Path) -> None:
    """freeze_backbone with unfreeze_epoch=1 and max_epochs=1 kept the backbone frozen all run, silently (stages
    the run never reaches are warned of)."""
    with pytest.warns(UserWarning, match=r"max_epochs=1 ends before unfreeze_epoch=1 .*stays frozen for all of "
                                         r"this fit"):
        trainer(tmp_path, 1, RecordBackbone()).fit(fine_tuned_system(), datamodule=small_world())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ends before unfreeze_epoch")
        trainer(tmp_path, 2, RecordBackbone()).fit(fine_tuned_system(), datamodule=small_world())


def test_an_icnn_whose_top_filters_start_frozen_says_so(tmp_path: Path) -> None:
    """ICNN's first interpretable layer reads the backbone's top conv stage: with the backbone frozen (the README's
    fine-tuning recipe) its filter loss trained no weight and its filter metrics scored the pretrained filters, with no
    word. Said at fit start with how long it lasts; an unfrozen backbone or the lambda-0 twin say nothing."""
    import warnings

    from zoo.icnn.system import ICNNSystem

    def said(epochs: int = 1, ckpt_path: Path | None = None, save: Path | None = None, **kwargs: object) -> list[str]:
        system = ICNNSystem(num_classes=4, image_size=32, **kwargs)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=1, limit_val_batches=0,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, num_sanity_val_steps=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(system, datamodule=small_world(), ckpt_path=ckpt_path)
        if save is not None:
            trainer.save_checkpoint(save)
        return [str(w.message) for w in caught if "top_filters" in str(w.message)]

    assert len(frozen := said(freeze_backbone=True)) == 1 and "frozen for the whole fit" in frozen[0], frozen
    assert not said(freeze_backbone=True, unfreeze_epoch=0)  # trains from the start
    assert "until epoch 1 (unfreeze_epoch)" in said(2, save=tmp_path / "e2.ckpt", freeze_backbone=True,
                                                    unfreeze_epoch=1)[0]
    assert not said(3, ckpt_path=tmp_path / "e2.ckpt", freeze_backbone=True, unfreeze_epoch=1)  # resumed past it
    assert "for the whole fit" in said(model_kwargs={"freeze_backbone": True})[0]  # the model built it frozen
    from losses.icnn import FilterPartLoss

    assert not said() and not said(freeze_backbone=True, loss=FilterPartLoss(weight=0))

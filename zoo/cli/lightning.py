"""ZooCLI: LightningCLI with the zoo's defaults (run folders, checkpoints, RNG state, data -> model links)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from zoo.cli.errors import ZooArgumentParser, configuration_phase
from zoo.engine.callbacks import LatestCheckpoint, RNGStateCallback

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "checkpoints",
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "checkpoints", "name": "default", "version": ""},
    },
}


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's defaults: any LightningModule/DataModule by class_path, the datamodule's
    `num_classes`, `num_channels` and `image_size` linked into the model, a best+last ModelCheckpoint, seed 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", ZooArgumentParser)  # short errors with a did-you-mean (zoo.cli.errors)
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_lightning_class_args(RNGStateCallback, "rng_state")  # resumed runs draw what the dead one would
        parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")  # last.ckpt after every validation
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": False,  # last.ckpt comes from LatestCheckpoint, refreshed every validation
            "checkpoint.filename": "best-epoch{epoch}-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_channels", "model.init_args.in_chans", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")
        parser.link_arguments("data.model_inputs", "model.init_args.data_inputs", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        """A class refusing its arguments (a data folder that does not exist) raises its own error, marked as a
        configuration error, instead of jsonargparse's wrapper that repeats it inside a union-type message."""
        with configuration_phase():
            super().instantiate_classes()

    def before_fit(self) -> None:
        """Auxiliary models (L2X's black box, the textual sentence classifier) are trained before the fit is
        launched, so a distributed run trains them with its own strategy."""
        from zoo.engine import prepare_auxiliaries

        if hasattr(self.model, "auxiliaries"):
            prepare_auxiliaries(self.model, self.trainer, self.datamodule)

    def _parse_ckpt_path(self) -> None:
        """Lightning copies a `--ckpt_path` checkpoint's hyperparameters over the config; refuse first, naming both,
        a checkpoint of another System or model (else the run would silently rebuild the checkpoint's model and
        pair it with this config's loss)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            from zoo.weights import check_config_fits_checkpoint, read_checkpoint

            with configuration_phase():
                check_config_fits_checkpoint(self.config[subcommand].get("model"), read_checkpoint(ckpt_path),
                                             f"--ckpt_path {ckpt_path!r}")
        super()._parse_ckpt_path()


def fit(cli: LightningCLI, ckpt_path: str | None = None) -> None:
    """`trainer.fit` of a CLI's model and data, its auxiliary models prepared first (with the run's strategy)."""
    from zoo.engine import prepare_auxiliaries

    if hasattr(cli.model, "auxiliaries"):
        prepare_auxiliaries(cli.model, cli.trainer, cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)

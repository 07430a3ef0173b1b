"""LightningDataModules yielding dict batches with the task targets and all the ground truth a dataset knows."""

from datamodules._base import DatasetLayoutError, DataSettingError, DictDataModule
from datamodules.cub200 import CUB200DataModule
from datamodules.digits import DigitsDataModule
from datamodules.idx import IDXDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.l2x_synthetic import L2XSyntheticDataModule
from datamodules.parts_world import PartsWorldDataModule, PartsWorldScenesDataModule
from datamodules.rule_series import RuleSeriesDataModule, SeriesFileDataModule
from datamodules.text import CSVTextDataModule, IMDBDataModule, SyntheticSentimentDataModule
from datamodules.voc import VOCDataModule

__all__ = ["CSVTextDataModule", "CUB200DataModule", "DataSettingError", "DatasetLayoutError", "DictDataModule",
           "DigitsDataModule", "IDXDataModule", "IMDBDataModule", "ImageFolderDataModule", "L2XSyntheticDataModule",
           "PartsWorldDataModule", "PartsWorldScenesDataModule", "RuleSeriesDataModule", "SeriesFileDataModule",
           "SyntheticSentimentDataModule", "VOCDataModule"]

"""LightningDataModules yielding dict batches with the task targets and all the ground truth a dataset knows."""

from datamodules._base import DatasetLayoutError, DictDataModule
from datamodules.cub200 import CUB200DataModule
from datamodules.digits import DigitsDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.parts_world import PartsWorldDataModule

__all__ = ["CUB200DataModule", "DatasetLayoutError", "DictDataModule", "DigitsDataModule", "ImageFolderDataModule",
           "PartsWorldDataModule"]

"""Data for training: torch Datasets over patch caches, albumentations pipelines (around the
preprocessing contract of :mod:`lymphnode.models.preprocess`) and the LightningDataModules
(pretraining and few-label fine-tuning)."""

from __future__ import annotations

from lymphnode.data.datamodules import (
    FinetuneDataModule,
    PretrainDataModule,
    slide_folds,
    stratified_folds,
    stratified_subset,
)
from lymphnode.data.datasets import CacheDataset
from lymphnode.data.transforms import (
    HEDJitter,
    PreprocessStep,
    build_eval_transform,
    build_train_transform,
)

__all__ = [
    "CacheDataset",
    "FinetuneDataModule",
    "HEDJitter",
    "PreprocessStep",
    "PretrainDataModule",
    "build_eval_transform",
    "build_train_transform",
    "slide_folds",
    "stratified_folds",
    "stratified_subset",
]

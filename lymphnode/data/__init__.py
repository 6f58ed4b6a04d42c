"""Data for training: torch Datasets over patch caches, albumentations pipelines, stain
normalisation and the LightningDataModules (pretraining and few-label fine-tuning)."""

from __future__ import annotations

from lymphnode.data.datamodules import (
    FinetuneDataModule,
    PretrainDataModule,
    stratified_folds,
    stratified_subset,
)
from lymphnode.data.datasets import CacheDataset
from lymphnode.data.stain import MacenkoNormalizer, ReinhardNormalizer, build_stain_normalizer
from lymphnode.data.transforms import (
    HEDJitter,
    build_eval_transform,
    build_train_transform,
    normalize_stats,
)

__all__ = [
    "CacheDataset",
    "FinetuneDataModule",
    "HEDJitter",
    "MacenkoNormalizer",
    "PretrainDataModule",
    "ReinhardNormalizer",
    "build_eval_transform",
    "build_stain_normalizer",
    "build_train_transform",
    "normalize_stats",
    "stratified_folds",
    "stratified_subset",
]

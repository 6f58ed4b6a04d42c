"""Data for training, one module per job:

- ``datasets``: a torch ``Dataset`` over a patch cache (each reading process opens the cache);
- ``transforms``: the albumentations pipelines (D4 + colour / HED jitter for training) around the
  preprocessing contract of :mod:`lymphnode.models.preprocess`;
- ``samplers``: the training order and augmentation seeds by (seed, epoch, patch), so that a
  resumed run repeats an uninterrupted one;
- ``datamodules``: the LightningDataModules: pretraining (unlabeled cache, seeded train/val split)
  and few-label fine-tuning (stratified, nested labeled subsets and folds; the test cache); under
  DDP every validation/test patch is scored on exactly one process.
"""

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

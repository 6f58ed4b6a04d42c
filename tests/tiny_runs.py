"""Tiny training runs in this process, for the budget / checkpoint / baseline tests.

:func:`write_caches` lays out three tiny caches (32 px patches at "level 1", pink tissue with
dark tumour discs) as ``python -m lymphnode.prepare`` does under ``<root>/caches``;
:func:`run` composes ``conf/train.yaml`` with Hydra's compose API and calls
:func:`lymphnode.train.train`, as the CLI does, and returns what it returned or raised with the
run's results.json. :class:`Recorder` is a callback that keeps what happened at every step and
validation (class-level, so a test reads it after ``train`` built and dropped the instance).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lymphnode.patches.cache import CacheWriter
from lymphnode.train import read_results, train

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PATCH = 32  # px
# 10 labeled patches, 5 folds: 8 training patches, batch 4 -> 2 optimizer steps per epoch.
TINY = (
    "trainer=cpu",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "model.base_width=4",
    "model.depth=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "task.log_images_every_n_epochs=0",
    "callbacks.progress_bar.refresh_rate=0",
    "logger=none",
    "~callbacks.lr_monitor",  # (needs a logger)
)
FINETUNE = ("data.labeled_size=10", "data.folds=5")
STEPS_PER_EPOCH = 2  # fine-tuning


def _patch(rng: np.random.Generator, tumor: bool) -> tuple[np.ndarray, np.ndarray]:
    """A (P, P, 3) uint8 pink patch and its (P, P) {0,1} mask: tumour = dark purple disc."""
    image = np.empty((PATCH, PATCH, 3), np.uint8)
    image[:] = (230, 170, 200)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((PATCH, PATCH), np.uint8)
    if tumor:
        yy, xx = np.mgrid[:PATCH, :PATCH]
        cy, cx = rng.integers(8, PATCH - 8, 2)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(36, 100)] = 1
        image[mask == 1] = (110, 50, 140)
    return image, mask


def _write_cache(path: Path, slides: Sequence[str], n: int, masks: bool, seed: int) -> None:
    writer = CacheWriter(
        path, {"level": 1, "patch_size": PATCH, "source": "tests/tiny_runs.py"},
        codec="raw", patch_size=PATCH, has_masks=masks,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    for s, slide in enumerate(slides):
        with writer.slide(slide, n=n) as shard:
            for k in range(n):
                tumor = k % 2 == 1
                image, mask = _patch(rng, tumor)
                shard.add(
                    image, mask if masks else None, x=64 * k, y=64 * s, level=1, label=int(tumor)
                )
        writer.commit(slide, shard.info)
    writer.finalize(list(slides))


def write_caches(root: Path, test_slides: Sequence[str] = ("tumor_003",)) -> Path:
    """``<root>/{unlabeled,labeled,test}``: 48 unlabeled, 24 labeled, 8 test patches (split
    evenly over ``test_slides``; every second patch of a slide has tumour)."""
    _write_cache(root / "unlabeled", ["tumor_001", "normal_001"], 24, masks=False, seed=1)
    _write_cache(root / "labeled", ["tumor_001", "tumor_002"], 12, masks=True, seed=2)
    _write_cache(root / "test", list(test_slides), 8 // len(test_slides), masks=True, seed=3)
    return root


def compose_train(*overrides: str) -> DictConfig:
    """conf/train.yaml composed with ``overrides`` (Hydra's compose API, no run dir change)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def run(
    root: Path, caches: Path, *overrides: str, experiment: str = "scratch", constant_lr: bool = True
) -> tuple[Any, dict[str, Any]]:
    """``train()`` of ``experiment=<experiment>`` on the tiny caches: (its return value or the
    exception it raised, the run's results.json). ``constant_lr``: ``task.scheduler=null`` (the
    tests of budgets and checkpoints do not depend on the schedule)."""
    Recorder.reset()
    cfg = compose_train(
        f"experiment={experiment}", f"paths.root={root}", f"paths.cache_dir={caches}",
        *TINY, *(FINETUNE if experiment != "pretrain" else ()),
        *(("task.scheduler=null",) if constant_lr else ()), *overrides,
    )  # fmt: skip
    try:
        outcome: Any = train(cfg)
    except BaseException as err:
        outcome = err
    results = read_results(Path(cfg.run_dir) / "results.json")
    assert results is not None, f"no results.json in {cfg.run_dir}"
    return outcome, results


class Recorder(pl.Callback):
    """Keeps ``steps`` (global step after every optimizer step), ``lrs`` (the first param
    group's LR each optimizer step trains with), ``validations`` ([(global step, {metric: value})] at every validation
    during fit); optionally sends SIGTERM to this process after step ``sigterm_at``."""

    steps: ClassVar[list[int]] = []
    lrs: ClassVar[list[float]] = []
    validations: ClassVar[list[tuple[int, dict[str, float]]]] = []

    def __init__(self, sigterm_at: int | None = None) -> None:
        self.sigterm_at = sigterm_at

    @classmethod
    def reset(cls) -> None:
        cls.steps, cls.lrs, cls.validations = [], [], []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        Recorder.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        Recorder.steps.append(trainer.global_step)
        if self.sigterm_at is not None and trainer.global_step == self.sigterm_at:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        Recorder.validations.append((trainer.global_step, metrics))


RECORDER = "+callbacks.recorder._target_=tiny_runs.Recorder"


class Pace(pl.Callback):
    """Sleeps ``seconds`` after every optimizer step: a run slow enough to be killed part way by
    another process (the scale-out tests' SIGTERM of a sweep job)."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        import time

        time.sleep(self.seconds)

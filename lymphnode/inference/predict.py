"""Whole-slide sliding-window inference: batched prediction into tumor-probability heatmaps.

The jobs around it have their own modules: the tile grid over tissue and the tiles
(:mod:`lymphnode.inference.grid`), stitching (:mod:`lymphnode.inference.stitch`), overlays
(:mod:`lymphnode.inference.overlay`), settings and device (:mod:`lymphnode.inference.settings`).

A slide is covered by a grid of tiles (``patch_size`` px at the model's read level, every ``stride``
px); only tiles that touch tissue are read. DataLoader workers read tiles in parallel with the
model's compute (each worker opens the slide itself) and pass raw uint8 tiles, which are normalised
on the model's device (4x fewer bytes between processes and to a GPU than float32). Each tile's tumor
probabilities are blended (optionally with a window that down-weights tile borders) into two on-disk
float32 arrays at the heatmap's resolution (``downsample`` level-0 px per heatmap px): the weighted
sum and the weight. The heatmap is their ratio, so memory does not grow with the size of the slide.
The blending runs on the model's device as two small matrix products per tile, so only a
(heatmap rows x cols) block per tile comes back to the host, one batch behind the model.

On the CPU, DataLoader workers and torch's intra-op threads share the cores: by default the model
gets the cores the workers do not take (``InferenceSettings.num_threads``); oversubscribing them
makes torch's threads wait on each other and can halve the throughput.

Coordinates: level-0 px, (x, y) top-left, as OpenSlide. Heatmap pixel (i, j) covers level-0
``[j * D, (j + 1) * D) × [i * D, (i + 1) * D)`` with D the downsample; its shape is
``(ceil(h0 / D), ceil(w0 / D))`` — the same grid :meth:`Annotations.mask` uses.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphnode.inference.adapt import adapt_batchnorm, batchnorm_layers, batchnorm_record
from lymphnode.inference.grid import TileDataset, plan_slide, tile_loader
from lymphnode.inference.heatmap import Heatmap
from lymphnode.inference.settings import InferenceSettings, resolve_device
from lymphnode.inference.stitch import HeatmapStitcher, TileBlocks
from lymphnode.models.preprocess import Preprocess
from lymphnode.wsi.slide import Slide
from lymphnode.wsi.tissue import TissueMask

log = logging.getLogger(__name__)


def _d4(x: torch.Tensor, k: int) -> torch.Tensor:
    """Dihedral transform k (0..7) of (B, C, H, W): rotate by 90°·(k % 4), then flip if k ≥ 4."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def _d4_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = torch.flip(x, dims=(3,))
    return torch.rot90(x, -(k % 4), dims=(2, 3))


@torch.no_grad()
def tile_probabilities(model: torch.nn.Module, batch: torch.Tensor, *, tta: bool, bf16: bool,
                       device: torch.device) -> torch.Tensor:  # fmt: skip
    """Tumor probabilities (B, H, W) float32 on ``device`` for a normalised batch (B, 3, H, W)
    on ``device``, from the task's ``probabilities(x)`` (B, 1, H, W); with ``tta`` the mean
    over the 8 D4 transforms, in the input's frame."""
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    transforms = range(8) if tta else (0,)
    total: torch.Tensor | None = None
    with autocast:
        for k in transforms:
            probs = model.probabilities(_d4(batch, k))  # type: ignore[operator]  # (B, 1, H, W)
            prob = _d4_inverse(probs.float(), k)
            total = prob if total is None else total + prob
    assert total is not None
    return (total / len(transforms))[:, 0].float()


def predict_slide(
    model: torch.nn.Module,
    preprocess: Preprocess,
    slide: Slide,
    tissue: TissueMask,
    *,
    settings: InferenceSettings,
    workdir: Path,
    progress: bool = True,
) -> Heatmap:
    """Run ``model`` (a task module: ``probabilities(x)``) over the tissue of ``slide``, its
    tiles made by ``preprocess`` (read level, stain normalisation, normalisation; tile side
    ``settings.patch_size`` or the contract's), and return its heatmap (see module docstring)."""
    from tqdm import tqdm

    patch_size = settings.patch_size or preprocess.patch_size
    plan = plan_slide(
        slide, tissue, patch_size=patch_size, level=preprocess.level, settings=settings
    )
    stitcher = HeatmapStitcher(
        plan.heatmap_shape, settings.downsample, plan.level_downsample, patch_size,
        settings.blend, workdir,
    )  # fmt: skip
    dataset = TileDataset(slide, plan.corners, preprocess, patch_size)
    loader = tile_loader(dataset, settings)
    bar = tqdm(
        total=len(dataset), desc=slide.path.stem, unit="tile", disable=not progress, leave=False
    )
    with adapted_to(model, dataset, preprocess, settings, slide.path.stem):
        run_tiles(model, loader, stitcher, preprocess=preprocess, settings=settings,
                  on_batch=lambda n: bar.update(n))  # fmt: skip
    bar.close()
    heat = stitcher.result()
    del stitcher
    return Heatmap(
        slide=slide.path.stem,
        probabilities=heat,
        downsample=settings.downsample,
        level0_size=slide.dimensions,
        mpp=slide.mpp,
    )


@contextlib.contextmanager
def adapted_to(
    model: torch.nn.Module,
    dataset: TileDataset,
    preprocess: Preprocess,
    settings: InferenceSettings,
    name: str,
) -> Iterator[dict[str, Any]]:
    """With ``settings.adapt_bn``: the model's BatchNorm statistics re-estimated on up to
    ``settings.adapt_tiles`` evenly spaced tiles of ``dataset`` (the slide's own tissue, AdaBN)
    for the duration, the checkpoint's restored after; otherwise (or for a network without
    BatchNorm layers, e.g. a ViT or a GroupNorm UNet) nothing changes. Yields
    :func:`lymphnode.inference.adapt.batchnorm_record` of the statistics used."""
    if not settings.adapt_bn or len(dataset) == 0:
        yield batchnorm_record()
        return
    if not batchnorm_layers(model):  # GroupNorm/LayerNorm networks: nothing to re-estimate
        log.info("%s: adapt_bn: the network has no BatchNorm layer, its own statistics used", name)
        yield batchnorm_record()
        return
    device = resolve_device(settings.device)
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(dataset)
    chosen = np.unique(np.linspace(0, n - 1, min(n, settings.adapt_tiles)).round().astype(int))
    subset = TileDataset(dataset.slide, dataset.corners[chosen], preprocess, dataset.patch_size)
    loader = tile_loader(subset, settings)
    batches = (
        preprocess.normalize(images, device, channels_last=settings.channels_last)
        for images, _ in loader
    )
    try:
        with _torch_settings(model_threads(settings, device), device):
            record = adapt_batchnorm(
                model,
                batches,
                model.probabilities,
                layers=settings.adapt_layers,  # type: ignore[arg-type]
            )
        log.info("%s: BatchNorm statistics adapted on %d tiles (AdaBN)", name, record["tiles"])
        yield record
    finally:
        model.load_state_dict(saved)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def model_threads(settings: InferenceSettings, device: torch.device) -> int | None:
    """torch intra-op threads for the model (None: leave torch's setting): ``num_threads`` when
    given; on the CPU, the cores the DataLoader workers leave free (at least 1, at most torch's
    current setting)."""
    if settings.num_threads is not None:
        return settings.num_threads
    if device.type != "cpu":
        return None
    return max(1, min(torch.get_num_threads(), available_cpus() - settings.num_workers))


@contextlib.contextmanager
def _torch_settings(threads: int | None, device: torch.device) -> Iterator[None]:
    """Set torch's intra-op threads (and cuDNN autotuning on CUDA: tiles have one shape) for the
    duration, then restore them."""
    old_threads, old_bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_bench


def run_tiles(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    stitcher: HeatmapStitcher,
    *,
    preprocess: Preprocess,
    settings: InferenceSettings,
    on_batch: Callable[[int], object] | None = None,
) -> int:
    """Run ``model`` (``probabilities(x)``) over ``batches`` of (stain-normalised uint8 tiles
    (B, P, P, 3), level-0 corners (B, 2)), normalised on the device by
    :meth:`Preprocess.normalize`, and blend the probabilities into ``stitcher``; returns the
    number of tiles.

    The blocks of batch i are added to the on-disk sums after batch i + 1 is queued on the device,
    so a GPU keeps computing while the host adds. Torch's threads are set by :func:`model_threads`
    for the duration.
    """
    device = resolve_device(settings.device)
    model = model.to(device).eval()
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    n = 0
    pending: TileBlocks | None = None
    with _torch_settings(model_threads(settings, device), device), torch.inference_mode():
        for images, xy in batches:
            x = preprocess.normalize(images, device, channels_last=settings.channels_last)
            probs = tile_probabilities(
                model, x, tta=settings.tta, bf16=settings.bf16, device=device
            )
            blocks = stitcher.project(xy.numpy(), probs)
            if pending is not None:
                stitcher.accumulate(pending)
            pending = blocks
            n += len(images)
            if on_batch is not None:
                on_batch(len(images))
        if pending is not None:
            stitcher.accumulate(pending)
    return n


def _scratch_prefix(name: str) -> str:
    """``.tmp-<slide>-<host>-``: what this machine's scratch folders of ``name`` start with."""
    return f".tmp-{name}-{socket.gethostname()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_scratch(parent: Path, name: str) -> list[Path]:
    """Remove the scratch folders of slide ``name`` under ``parent`` that a process of this
    machine left when it died (kill -9, SIGBUS on a full disk, power loss): those whose process
    id no longer runs. Folders of running processes and of other machines are kept. Returns the
    removed folders."""
    prefix = _scratch_prefix(name)
    removed = []
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.warning("%s: removed the scratch folder %s of a run that died", name, path)
    return removed


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """A temporary folder under ``parent`` for one slide's on-disk arrays, removed afterwards
    (``.tmp-<slide>-<host>-<pid>-*``; those that dead processes of this machine left are removed
    first, :func:`remove_stale_scratch`)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(parent, name)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f"{_scratch_prefix(name)}{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "available_cpus",
    "model_threads",
    "predict_slide",
    "remove_stale_scratch",
    "run_tiles",
    "scratch_dir",
    "tile_probabilities",
]

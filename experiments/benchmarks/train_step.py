"""Training throughput: Lightning ``fit`` vs a plain PyTorch loop, channels-last and bf16 effects.

Both sides train the same UNet (lymphnode.models.UNet) with the same loss as
:class:`lymphnode.tasks.MultiTaskModule` (BCE on the segmentation logits + MSE reconstruction),
AdamW, on the same in-memory batches (random images/masks, so the data pipeline is not measured:
see the data benchmark for cache + augmentation patches/s). Lightning runs the real
MultiTaskModule with no logger, checkpointing or progress bar; the time covers the training steps
after the warm-up steps (setup and the first steps excluded on both sides). Each variant is run
``--repeats`` times, interleaved, and the median is reported.

    .venv/bin/python experiments/benchmarks/train_step.py                       # CPU, width 8
    .venv/bin/python experiments/benchmarks/train_step.py --base-width 32 --steps 6
    .venv/bin/python experiments/benchmarks/train_step.py --device cuda --base-width 64 \
        --batch-size 32 --patch-size 300 --steps 50 --warmup 10          # a GPU (bf16, channels-last)

Prints one line per variant (images/s, median and spread) and the Lightning/plain ratio; ``--json``
writes the figures to a file too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lymphnode.models.unet import UNet
from lymphnode.tasks import MultiTaskModule


class RandomPatches(Dataset):
    """``n`` fixed random patches as the DataModules deliver them: {"image": (3, H, W) float32
    normalised, "mask": (1, H, W) float32 {0, 1}} (generated once, so loading costs nothing)."""

    def __init__(self, n: int, patch_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, patch_size, patch_size, generator=g)
        self.masks = (torch.rand(n, 1, patch_size, patch_size, generator=g) > 0.7).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "mask": self.masks[i]}


@dataclass
class Variant:
    name: str
    runner: str  # "plain" | "lightning"
    channels_last: bool
    bf16: bool


@dataclass
class Figure:
    variant: str
    images_per_s: float  # median over repeats
    best_images_per_s: float  # the fastest repeat (least disturbed by other processes)
    images_per_cpu_s: float  # median; with --threads 1: what one free core does, under any load
    runs: list[float]


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"base_width": args.base_width, "depth": args.depth, "top_skip": False}


def _autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _batches(loader: DataLoader, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        for batch in loader:
            yield batch
            steps -= 1
            if steps == 0:
                return


def run_plain(
    args: argparse.Namespace, loader: DataLoader, variant: Variant
) -> tuple[float, float]:
    """(images/s, images per CPU-s) of a hand-written loop: forward, the multi-task loss, backward, AdamW step."""
    torch.manual_seed(0)
    net = UNet(**model_config(args)).to(args.device)
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    net.train()
    start = cpu_start = 0.0
    for step, batch in enumerate(_batches(loader, args.warmup + args.steps)):
        if step == args.warmup:
            _sync(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
        x = batch["image"].to(args.device, non_blocking=True)  # (B, 3, H, W)
        y = batch["mask"].to(args.device, non_blocking=True)  # (B, 1, H, W)
        with _autocast(args.device, variant.bf16):
            out = net(x)
            loss = F.binary_cross_entropy_with_logits(out.seg, y) + F.mse_loss(out.recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Lightning reads the loss on the host every step (NaN guard, progress): so do we.
        if not torch.isfinite(loss.detach()).item():
            raise RuntimeError(f"non-finite loss at step {step}")
    _sync(args.device)
    images = args.steps * args.batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


class _StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = self.cpu_start = self.cpu_end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.global_step == self.warmup:
            _sync(self.device)
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        _sync(self.device)
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


def run_lightning(
    args: argparse.Namespace, loader: DataLoader, variant: Variant
) -> tuple[float, float]:
    """(images/s, images per CPU-s) of ``Trainer.fit`` on the real MultiTaskModule (no logger/checkpoints/val)."""
    torch.manual_seed(0)
    module = MultiTaskModule(
        model=model_config(args),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4),
        scheduler=None,
        patch_size=args.patch_size,
        log_images_every_n_epochs=0,
    )
    if variant.channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    timer = _StepTimer(args.warmup, args.device)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if variant.bf16 else "32-true",
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    images = args.steps * args.batch_size
    return images / (timer.end - timer.start), images / (timer.cpu_end - timer.cpu_start)


RUNNERS: dict[str, Callable[[argparse.Namespace, DataLoader, Variant], tuple[float, float]]] = {
    "plain": run_plain,
    "lightning": run_lightning,
}


def variants(args: argparse.Namespace) -> list[Variant]:
    out = []
    for runner in ("plain", "lightning"):
        out.append(Variant(f"{runner} fp32 contiguous", runner, False, False))
        out.append(Variant(f"{runner} fp32 channels_last", runner, True, False))
        if not args.no_bf16:
            out.append(Variant(f"{runner} bf16 channels_last", runner, True, True))
    return out


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}, "
        f"torch {torch.__version__}, pytorch_lightning {pl.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=304)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 variants")
    parser.add_argument("--only", default=None, help="run the variants whose name holds this")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")

    data = RandomPatches(args.batch_size * 4, args.patch_size)
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        pin_memory=args.device == "cuda",
    )
    chosen = [v for v in variants(args) if args.only is None or args.only in v.name]
    runs: dict[str, list[float]] = {v.name: [] for v in chosen}
    cpu_runs: dict[str, list[float]] = {v.name: [] for v in chosen}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for variant in chosen:
            wall, cpu = RUNNERS[variant.runner](args, loader, variant)
            runs[variant.name].append(wall)
            cpu_runs[variant.name].append(cpu)

    load_after = os.getloadavg()[0]
    print(f"# {datetime.date.today()} | {machine()}")
    print(f"# load average (1 min) before/after: {load_before:.2f} / {load_after:.2f}")
    print(
        f"# UNet base_width={args.base_width} depth={args.depth}, {args.patch_size}² px, "
        f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, "
        f"median of {args.repeats}"
    )
    figures = []
    for variant in chosen:
        values = runs[variant.name]
        per_cpu_s = statistics.median(cpu_runs[variant.name])
        figure = Figure(variant.name, statistics.median(values), max(values), per_cpu_s, values)
        figures.append(figure)
        print(
            f"{variant.name:32s} {figure.images_per_s:8.2f} img/s median, "
            f"{figure.best_images_per_s:8.2f} best (runs {min(values):.2f}-{max(values):.2f}), "
            f"{per_cpu_s:8.2f} img per CPU-s"
        )
    ratios = {}
    for suffix in ("fp32 contiguous", "fp32 channels_last", "bf16 channels_last"):
        plain, light = runs.get(f"plain {suffix}"), runs.get(f"lightning {suffix}")
        if plain and light:  # paired by repeat: both ran back to back under the same load
            ratios[suffix] = statistics.median(lt / pt for lt, pt in zip(light, plain))
            print(f"lightning / plain ({suffix}): {ratios[suffix]:.3f} (median of paired runs)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": str(datetime.date.today()),
                    "machine": machine(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "load_average": [load_before, load_after],
                    "figures": [asdict(f) for f in figures],
                    "lightning_over_plain": ratios,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

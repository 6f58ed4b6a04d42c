"""Data-pipeline throughput (patch cache + augmentations) per DataLoader worker vs the UNet's
training throughput, and how many workers one GPU needs.

Builds two temporary labeled caches (codecs "raw" and "jpeg") of ``--patch-size`` patches — crops
of the real H&E fixture ``../shared/fixtures/real/slides/cmu_small_region.svs`` when present, else
a synthetic H&E texture — and measures, in this process with one thread (what one DataLoader
worker does: read + decode + transform + collate), patches per second for each pipeline. Then
times UNet training steps (forward + backward + AdamW, MSE reconstruction + BCE segmentation) on
this CPU with all its threads, counts the UNet's training FLOPs per patch, and estimates the
workers an H100 needs from an assumed utilisation of its bf16 peak. Prints Markdown.

    python experiments/benchmarks/data_pipeline.py                       # defaults below
    python experiments/benchmarks/data_pipeline.py --patches 512 --repeats 7 --widths 8 32
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import lymphnode  # noqa: F401  (NO_ALBUMENTATIONS_UPDATE)
from lymphnode.data.datasets import CacheDataset
from lymphnode.data.transforms import HEDJitter, build_eval_transform, build_train_transform
from lymphnode.models.preprocess import Preprocess
from lymphnode.models.stain import MacenkoNormalizer, ReinhardNormalizer
from lymphnode.models.unet import UNet
from lymphnode.patches.cache import CacheWriter, PatchCache

ROOT = Path(__file__).resolve().parents[2]
REAL_SLIDE = ROOT.parent / "shared" / "fixtures" / "real" / "slides" / "cmu_small_region.svs"

# H100 SXM: 989 TFLOP/s dense bf16 (NVIDIA H100 datasheet). Convolutional UNets with bf16 and
# channels_last reach a fraction of it; the range below is an ASSUMPTION, not a measurement.
H100_PEAK_BF16 = 989e12
H100_UTILISATION = (0.25, 0.50)
MIN_ESTIMATED_WIDTH = 32  # below it a UNet step is bound by memory traffic, not FLOPs


# ------------------------------------------------------------------------------------ patches
def source_image() -> tuple[np.ndarray, str]:
    """A large RGB H&E image to crop patches from: the real fixture, else a synthetic texture."""
    if REAL_SLIDE.is_file():
        import tifffile

        with tifffile.TiffFile(REAL_SLIDE) as tif:
            return np.ascontiguousarray(tif.pages[0].asarray()[..., :3]), REAL_SLIDE.name
    rng = np.random.default_rng(0)
    size = 2048
    conc = np.stack(
        [
            cv2.GaussianBlur(rng.random((size, size), np.float32), (0, 0), s) * k
            for s, k in ((3, 4.0), (12, 3.0))
        ],
        axis=-1,
    )
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], np.float32)
    od = conc @ (stains / np.linalg.norm(stains, axis=1, keepdims=True))
    return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8), "synthetic H&E"


def build_cache(path: Path, codec: str, image: np.ndarray, n: int, patch: int) -> PatchCache:
    """n random crops (seeded) with a disc mask on every other patch."""
    rng = np.random.default_rng(1)
    writer = CacheWriter(path, {"benchmark": codec}, codec=codec, patch_size=patch, has_masks=True)
    with writer.slide("bench", n=n) as shard:
        for i in range(n):
            y = int(rng.integers(0, image.shape[0] - patch))
            x = int(rng.integers(0, image.shape[1] - patch))
            mask = np.zeros((patch, patch), np.uint8)
            if i % 2:
                cv2.circle(mask, (patch // 2, patch // 3), patch // 4, 1, -1)
            crop = np.ascontiguousarray(image[y : y + patch, x : x + patch])
            shard.add(crop, mask, x=x, y=y, level=0, label=i % 2)
    writer.commit("bench", shard.info)
    writer.finalize(["bench"])
    return PatchCache(path)


# -------------------------------------------------------------------------------------- timing
def median_rate(run: Callable[[], int], repeats: int) -> float:
    """Median items per CPU-second of this process over ``repeats`` timed runs after a warm-up.

    CPU time (``time.process_time``, all threads) rather than wall time, so that other processes
    on a shared machine do not lower the figure: for one thread it is the rate of one dedicated
    core; for a multi-threaded model step divide by the threads for a per-core figure. The wall
    rates are logged to stderr for comparison.
    """
    run()
    rates, walls = [], []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        n = run()
        rates.append(n / (time.process_time() - cpu))
        walls.append(n / (time.perf_counter() - wall))
    print(
        f"  {run.__qualname__}: per CPU-s {statistics.median(rates):.1f}, "
        f"per wall-s {statistics.median(walls):.1f}",
        file=sys.stderr,
    )
    return statistics.median(rates)


def loader_rate(cache_path: Path, transform: Any, repeats: int, batch: int) -> float:
    """Patches/s of one worker: DataLoader(num_workers=0) = read + decode + transform + collate."""
    dataset = CacheDataset(cache_path, None, transform, with_masks=True)
    loader = DataLoader(dataset, batch_size=batch, num_workers=0)

    def run() -> int:
        return sum(len(b["index"]) for b in loader)

    return median_rate(run, repeats)


def pipelines(reference: list[np.ndarray]) -> dict[str, Callable[[], Any]]:
    size = reference[0].shape[0]
    plain = Preprocess(level=0, patch_size=size)
    macenko = Preprocess(0, size, stain=MacenkoNormalizer().fit(reference).state())
    reinhard = Preprocess(0, size, stain=ReinhardNormalizer().fit(reference).state())
    return {
        "eval (normalise only)": lambda: build_eval_transform(plain),
        "train: D4 + colour jitter": lambda: build_train_transform(plain, seed=0),
        "train: D4 + colour jitter + HED": lambda: build_train_transform(plain, hed=True, seed=0),
        "train: Macenko + D4 + colour jitter": lambda: build_train_transform(macenko, seed=0),
        "train: Reinhard + D4 + colour jitter": lambda: build_train_transform(reinhard, seed=0),
        "eval: Macenko (val/test)": lambda: build_eval_transform(macenko),
    }


def transform_only_rates(
    patches: list[np.ndarray], masks: list[np.ndarray], repeats: int
) -> dict[str, float]:
    """Albumentations alone on in-memory uint8 arrays (no cache, no tensors), per core."""
    b = 64 / 255
    jitter = A.ColorJitter((1 - b, 1 + b), (0.25, 1.75), (0.75, 1.25), (-0.04, 0.04), p=1.0)
    d4cj = A.Compose([A.D4(p=1.0), jitter], seed=0)
    hed = A.Compose([HEDJitter(p=1.0)], seed=0)
    out = {}
    for name, pipeline in (("A.D4 + A.ColorJitter (uint8)", d4cj), ("HEDJitter alone", hed)):

        def run(p: A.Compose = pipeline) -> int:
            for image, mask in zip(patches, masks):
                p(image=image, mask=mask)
            return len(patches)

        out[name] = median_rate(run, repeats)
    return out


# --------------------------------------------------------------------------------------- model
def train_flops_per_patch(width: int, patch: int) -> float:
    """FLOPs of one training step (forward + backward) per patch, counted by torch."""
    net = UNet(base_width=width)
    x = torch.randn(1, 3, patch, patch)
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        (out.recon.square().mean() + out.seg.mean()).backward()
    return float(counter.get_total_flops())


def model_rate(width: int, patch: int, batch: int, steps: int, repeats: int) -> float:
    """Training patches/s of UNet(base_width=width) on this CPU (all threads)."""
    torch.manual_seed(0)
    net = UNet(base_width=width).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, patch, patch)
    y = (torch.rand(batch, 1, patch, patch) > 0.5).float()

    def run() -> int:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            out = net(x)
            loss = F.mse_loss(out.recon, x) + F.binary_cross_entropy_with_logits(out.seg, y)
            loss.backward()
            optimizer.step()
        return steps * batch

    return median_rate(run, repeats)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, albumentations "
        f"{A.__version__}, OpenCV {cv2.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=256, help="patches per cache")
    parser.add_argument("--patch-size", type=int, default=304)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--batch", type=int, default=16, help="DataLoader batch size")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--model-steps", type=int, default=3, help="steps per timed model run")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    image, source = source_image()
    print(f"# Data pipeline benchmark — {datetime.date.today()}\n")
    print(f"Machine: {machine()}.  ")
    print(
        f"Patches: {args.patches} crops of {args.patch_size}² from {source}, masks on half; "
        f"medians of {args.repeats} runs after a warm-up. Rates are per CPU-second of the "
        f"benchmark process (load average at start: {os.getloadavg()[0]:.1f}).\n"
    )

    with tempfile.TemporaryDirectory() as tmp:
        caches = {
            codec: build_cache(Path(tmp) / codec, codec, image, args.patches, args.patch_size)
            for codec in ("raw", "jpeg")
        }
        reference = [caches["raw"][i][0] for i in range(0, args.patches, args.patches // 16)]
        patches = [caches["raw"][i][0] for i in range(args.patches)]
        masks = [caches["raw"][i][1] for i in range(args.patches)]

        # one worker = one process with one thread
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        rates: dict[str, dict[str, float]] = {}
        for name, make in pipelines(reference).items():
            rates[name] = {
                codec: loader_rate(cache.path, make(), args.repeats, args.batch)
                for codec, cache in caches.items()
            }
        alone = transform_only_rates(patches, masks, args.repeats)
        torch.set_num_threads(threads)
        cv2.setNumThreads(-1)

    print("## Per worker (one process, one thread): read + decode + transform + collate\n")
    print("Patches per CPU-second = patches/s of one DataLoader worker on a dedicated core.\n")
    print("| pipeline | raw cache (patches/s) | jpeg cache (patches/s) |")
    print("|---|---:|---:|")
    for name, by_codec in rates.items():
        print(f"| {name} | {by_codec['raw']:.0f} | {by_codec['jpeg']:.0f} |")
    print("\nAugmentations alone on in-memory uint8 patches (no cache, no tensor conversion):\n")
    print("| transform | patches/s |")
    print("|---|---:|")
    for name, rate in alone.items():
        print(f"| {name} | {rate:.0f} |")

    if args.skip_model:
        return
    print(f"\n## UNet training throughput ({args.patch_size}², depth 4, batch norm)\n")
    print(
        f"CPU: this machine, {threads} threads, fp32, batch {args.model_batch}, AdamW, MSE + BCE; "
        f"patches per CPU-second x {threads} = patches/s with {threads} dedicated cores if the "
        "threads scale. H100: ESTIMATE = assumed utilisation x 989 TFLOP/s bf16 dense peak / training FLOPs per "
        f"patch (counted by torch.utils.flop_counter); utilisation {H100_UTILISATION[0]:.0%}-"
        f"{H100_UTILISATION[1]:.0%} is an assumption, not a measurement.\n"
    )
    worst = min(min(by_codec.values()) for by_codec in rates.values())
    best = rates["train: D4 + colour jitter"]["jpeg"]
    print(
        "| base width | GFLOP/patch (train) | CPU patches per CPU-s | workers to feed "
        f"{threads} cores | H100 patches/s (est.) | H100 workers, D4+jitter (jpeg) "
        "| H100 workers, slowest pipeline |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for width in sorted({*args.widths, 64}):
        flops = train_flops_per_patch(width, args.patch_size)
        cpu = (
            model_rate(width, args.patch_size, args.model_batch, args.model_steps, args.repeats)
            if width in args.widths
            else float("nan")
        )
        lo, hi = (u * H100_PEAK_BF16 / flops for u in H100_UTILISATION)
        cpu_cell = "—" if math.isnan(cpu) else f"{cpu:.1f}"
        feed_cpu = "—" if math.isnan(cpu) else f"{cpu * threads / best:.3f}"
        if width < MIN_ESTIMATED_WIDTH:  # narrow convs are memory-bound: the FLOP model fails
            gpu = "not estimated | — | —"
        else:
            gpu = (
                f"{lo:.0f}-{hi:.0f} | {math.ceil(lo / best)}-{math.ceil(hi / best)} | "
                f"{math.ceil(lo / worst)}-{math.ceil(hi / worst)}"
            )
        print(f"| {width} | {flops / 1e9:.1f} | {cpu_cell} | {feed_cpu} | {gpu} |")
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    main()

"""Whole-slide inference speed and memory: tiles/s, read/compute overlap, peak RSS, minutes per slide.

Three measurements, each on synthetic slides written here (mostly white pyramidal JPEG TIFFs with
H&E-like tissue on a grid of square cells; see :func:`write_bench_slide`) and a UNet with random
weights (speed does not depend on the weights):

``overlap``  Tiles/s of :func:`lymphnode.inference.predict.predict_slide` on the CPU, and its wall time next
    to the read-only time (the same DataLoader over the same tiles, no model) and the compute-only
    time (the same model, normalisation and stitching, :func:`run_tiles`, on the same tiles already
    in memory), for several (torch threads, DataLoader workers) settings; compute-only runs with
    the same torch threads as the full run. Target: wall <= 1.2 x max(read-only, compute-only).
``rss``  Peak memory of the real CLI (``python -m lymphnode.infer``, tissue mask, heatmap TIFF and
    overlay included) on slides of two sizes with the same tissue fraction, each in its own
    process: ``ru_maxrss`` of the largest process (wait4) and the peak summed PSS of the process
    tree (psutil, sampled). Target: ratio close to 1.
``slide``  Minutes per CAMELYON-sized slide (default 100k x 200k level-0 px, 30 % tissue, 300-px
    tiles at level 0, UNet width 64 depth 4): end to end through :func:`lymphnode.infer.
    run_inference` (tissue mask, tiles, heatmap TIFF, overlay), plus the components — read-only
    tiles/s over the first tiles and compute-only tiles/s on random tiles on the device — that say
    which side bounds it. For a GPU: ``--device cuda --bf16 --channels-last`` (see gpu_infer.sh);
    ``--tiny`` is a CPU dry run on a small slide.

Each measurement is repeated (``--repeats``, interleaved) and the median printed as a Markdown table
with the date, the machine and its load average (the figures depend on what else runs).

    .venv/bin/python experiments/benchmarks/infer.py overlap
    .venv/bin/python experiments/benchmarks/infer.py rss --sizes 4096 16384
    .venv/bin/python experiments/benchmarks/infer.py slide --tiny
    python3 experiments/benchmarks/infer.py slide --device cuda --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile
import torch

from lymphnode.inference.grid import TileDataset, plan_slide, tile_loader
from lymphnode.inference.predict import available_cpus, model_threads, predict_slide, run_tiles
from lymphnode.inference.settings import InferenceSettings, resolve_device
from lymphnode.inference.stitch import HeatmapStitcher
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks import MultiTaskModule
from lymphnode.wsi.pyramid import pyramid_shapes
from lymphnode.wsi.slide import open_slide
from lymphnode.wsi.tissue import tissue_mask

CAMELYON_MPP = 0.243  # µm per level-0 px (CAMELYON16, 40x)
TILE = 256  # TIFF tile side (px), write_pyramid's default
JPEG_QUALITY = 90  # write_pyramid's default
TEXTURE_VARIANTS = 8  # distinct tissue tiles (decode cost does not depend on repeats)
MEAN = STD = (0.5, 0.5, 0.5)  # normalisation of the benchmark checkpoints (cost is the same)


def bench_model(width: int, depth: int, patch_size: int) -> tuple[MultiTaskModule, Preprocess]:
    """A randomly initialised fine-tuning task module (what infer runs) and its contract."""
    preprocess = Preprocess(level=0, patch_size=patch_size, mean=MEAN, std=STD)
    net = {"_target_": "lymphnode.models.UNet", "base_width": width, "depth": depth,
           "top_skip": True}  # fmt: skip
    return MultiTaskModule(net=net, preprocess=preprocess).eval(), preprocess


# --------------------------------------------------------------------------- synthetic slides


def he_texture(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 H&E-like texture: pink stroma with smooth stain variation, purple
    nuclei, scanner noise (what a JPEG decoder and the tissue detector see; not realistic)."""
    rng = np.random.default_rng(seed)
    blur = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 8)
    blur /= np.abs(blur).max() + 1e-6
    image = np.array([220, 150, 190], np.float32) + blur[..., None] * np.array([15, 30, 20])
    nuclei = np.zeros((size, size), np.float32)
    for _ in range(size * size // 600):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(nuclei, centre, int(rng.integers(3, 7)), 1.0, -1)
    nuclei = cv2.GaussianBlur(nuclei, (0, 0), 1.0)[..., None]
    image = image * (1 - 0.6 * nuclei) + np.array([80, 40, 130], np.float32) * 0.6 * nuclei
    image += rng.normal(0, 3, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def tissue_cells(width: int, height: int, cell: int, fraction: float, seed: int) -> np.ndarray:
    """Bool (ceil(h / cell), ceil(w / cell)) map of tissue cells: smooth random blobs covering
    ``fraction`` of the cells (at least one)."""
    rng = np.random.default_rng(seed)
    shape = (math.ceil(height / cell), math.ceil(width / cell))
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), 1.5)
    cells = np.zeros(field.size, bool)
    cells[np.argsort(field, axis=None)[-max(1, round(fraction * field.size)) :]] = True
    return cells.reshape(shape)


def _tiff_options() -> dict[str, Any]:
    """write_pyramid's options for RGB levels (JPEG tiles)."""
    return {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": JPEG_QUALITY},
        "metadata": None,
    }


class _TileEncoder:
    """JPEG tile bytes exactly as tifffile writes them with write_pyramid's options (a one-tile
    TIFF is written in memory and its tile read back); cached by key unless the key is None."""

    def __init__(self) -> None:
        self.cache: dict[object, bytes] = {}

    def __call__(self, key: object, tile: Callable[[], np.ndarray]) -> bytes:
        if key is not None and key in self.cache:
            return self.cache[key]
        buf = io.BytesIO()
        tifffile.imwrite(buf, tile(), **_tiff_options())
        buf.seek(0)
        with tifffile.TiffFile(buf) as tif:
            page = tif.pages[0]
            tif.filehandle.seek(page.dataoffsets[0])
            data = tif.filehandle.read(page.databytecounts[0])
        if key is not None:
            self.cache[key] = data
        return data


def write_bench_slide(
    path: Path,
    width: int,
    height: int,
    *,
    tissue_fraction: float,
    cell: int,
    seed: int = 0,
    mpp: float = CAMELYON_MPP,
) -> float:
    """Write a mostly white pyramidal tiled JPEG TIFF (the layout of :func:`lymphnode.wsi.pyramid.
    write_pyramid`, OpenSlide generic-tiff) of ``width`` x ``height`` level-0 px with tissue on
    ``cell``-px squares (level 0) covering about ``tissue_fraction`` of it; returns the fraction
    drawn.

    The image never exists in memory: each level is a stream of pre-encoded tiles (a white tile, a
    few tissue tiles, and tiles encoded on the fly where one straddles tissue and glass), so a
    100k x 200k slide takes about half a minute and little memory. Levels above 0 show the same
    texture (not a true downsample): enough for the tissue detector and for timing reads.
    """
    if cell % TILE:
        raise SystemExit(f"--cell {cell} must be a multiple of the tile size {TILE}")
    cells = tissue_cells(width, height, cell, tissue_fraction, seed)
    texture = he_texture(4 * TILE, seed)
    variants = [
        texture[(i // 4) * TILE : (i // 4 + 1) * TILE, (i % 4) * TILE : (i % 4 + 1) * TILE]
        for i in range(TEXTURE_VARIANTS)
    ]
    white = np.full((TILE, TILE, 3), 245, np.uint8)
    encode = _TileEncoder()

    def level_tiles(w: int, h: int) -> Iterator[bytes]:
        scale = width / w  # level-0 px per level px
        last_row, last_col = cells.shape[0] - 1, cells.shape[1] - 1
        for ty in range(math.ceil(h / TILE)):
            rows = np.minimum(((ty * TILE + np.arange(TILE)) * scale // cell).astype(int), last_row)
            for tx in range(math.ceil(w / TILE)):
                cols = ((tx * TILE + np.arange(TILE)) * scale // cell).astype(int)
                cols = np.minimum(cols, last_col)
                if rows[0] == rows[-1] and cols[0] == cols[-1]:  # inside one cell
                    if cells[rows[0], cols[0]]:
                        v = (tx * 7 + ty * 13) % TEXTURE_VARIANTS
                        yield encode(("tissue", v), lambda v=v: variants[v])
                    else:
                        yield encode("white", lambda: white)
                else:
                    inside = cells[np.ix_(rows, cols)][..., None]
                    yield encode(None, lambda m=inside: np.where(m, variants[0], white))

    options = _tiff_options()
    tile = options.pop("tile")
    pixels_per_cm = 1e4 / mpp
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for k, (w, h) in enumerate(pyramid_shapes(width, height, TILE)):
            tif.write(
                level_tiles(w, h),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=tile,
                subfiletype=1 if k else 0,
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                **options,
            )
    os.replace(tmp, path)
    return float(cells.mean())


def write_checkpoint(path: Path, width: int, depth: int, patch_size: int) -> dict[str, Any]:
    """A lymphnode checkpoint (as the task modules save it) of a randomly initialised UNet."""
    module, _ = bench_model(width, depth, patch_size)
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return module.net.config


# --------------------------------------------------------------------------- reporting


def machine(device: torch.device) -> str:
    """One line: date, CPU, cores, GPU, torch, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", no GPU used"
    return (
        f"{datetime.date.today().isoformat()}, {cpu}, {available_cpus()} cores{gpu}, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    fmt = [
        [
            f"{v:.3g}"
            if isinstance(v, float) and abs(v) < 100
            else f"{v:.0f}"
            if isinstance(v, float)
            else str(v)
            for v in row
        ]
        for row in rows
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in fmt])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- overlap


def _parse_configs(spec: str) -> list[tuple[int | None, int]]:
    """ "auto:1,2:1" -> [(None, 1), (2, 1)]: (torch threads or auto, DataLoader workers)."""
    out = []
    for item in spec.split(","):
        threads, _, workers = item.partition(":")
        if not workers:
            raise SystemExit(f"--configs item {item!r}: expected THREADS:WORKERS, e.g. auto:1")
        out.append((None if threads == "auto" else int(threads), int(workers)))
    return out


def cmd_overlap(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="lnbench-") as tmp:
        path = Path(tmp) / "overlap.tif"
        write_bench_slide(
            path, args.size, args.size // 2, tissue_fraction=args.tissue, cell=args.cell
        )
        slide = open_slide(path)
        tissue = tissue_mask(slide)
        net, preprocess = bench_model(args.width, args.depth, args.patch_size)
        base = InferenceSettings(
            patch_size=args.patch_size,
            batch_size=args.batch_size,
            device=str(device),
            bf16=args.bf16,
            channels_last=args.channels_last,
        )
        plan = plan_slide(slide, tissue, patch_size=args.patch_size, level=0, settings=base)
        n = len(plan.corners)
        dataset = TileDataset(slide, plan.corners, preprocess, args.patch_size)
        batches = list(tile_loader(dataset, base))  # compute-only input, read once
        configs = _parse_configs(args.configs)
        runs: dict[tuple[int | None, int], dict[str, list[float]]] = {
            c: {"read": [], "compute": [], "wall": []} for c in configs
        }
        threads_used: dict[tuple[int | None, int], int | None] = {}
        for _ in range(args.repeats):
            for threads, workers in configs:
                settings = dataclasses.replace(base, num_workers=workers, num_threads=threads)
                threads_used[(threads, workers)] = model_threads(settings, device)
                rec = runs[(threads, workers)]
                t0 = time.perf_counter()
                count = sum(len(images) for images, _ in tile_loader(dataset, settings))
                rec["read"].append(time.perf_counter() - t0)
                stitcher = HeatmapStitcher(
                    plan.heatmap_shape,
                    base.downsample,
                    1.0,
                    args.patch_size,
                    base.blend,
                    Path(tmp) / "c",
                )
                t0 = time.perf_counter()
                run_tiles(net, batches, stitcher, preprocess=preprocess, settings=settings)
                _sync(device)
                rec["compute"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                predict_slide(
                    net,
                    preprocess,
                    slide,
                    tissue,
                    settings=settings,
                    workdir=Path(tmp) / "w",
                    progress=False,
                )
                rec["wall"].append(time.perf_counter() - t0)
                assert count == n
    rows, figures = [], []
    for (threads, workers), rec in runs.items():
        read, compute, wall = (statistics.median(rec[k]) for k in ("read", "compute", "wall"))
        ratio = wall / max(read, compute)
        used = threads_used[(threads, workers)]
        label = f"auto ({used})" if threads is None else str(threads)
        rows.append(
            [
                label,
                workers,
                n,
                read,
                compute,
                wall,
                ratio,
                n / wall,
                "yes" if ratio <= 1.2 else "no",
            ]
        )
        figures.append(
            {
                "threads": used,
                "threads_setting": threads,
                "workers": workers,
                "tiles": n,
                "read_s": read,
                "compute_s": compute,
                "wall_s": wall,
                "ratio": ratio,
                "tiles_per_s": n / wall,
                "runs": rec,
            }
        )
    print(f"\n## overlap: predict_slide vs read-only and compute-only ({machine(device)})\n")
    print(
        f"slide {args.size}x{args.size // 2} level 0, {args.tissue:.0%} tissue cells, {n} tiles "
        f"of {args.patch_size} px, UNet width {args.width} depth {args.depth}, batch "
        f"{args.batch_size}, channels_last {args.channels_last}, bf16 {args.bf16}, median of "
        f"{args.repeats}\n"
    )
    print(
        table(
            [
                "torch threads",
                "workers",
                "tiles",
                "read-only s",
                "compute-only s",
                "wall s",
                "wall / max",
                "tiles/s",
                "<= 1.2",
            ],
            rows,
        )
    )
    return {"overlap": figures}


# --------------------------------------------------------------------------- rss


def _tree_memory_mb(proc: Any, memory: str = "pss") -> float:
    """Summed PSS (``memory="pss"``: shared pages split between them) or RSS (``"rss"``) in MB
    of a process and its descendants."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info() if memory == "pss" else p.memory_info()
            total += getattr(info, memory)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20


def run_measured(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    memory: str = "pss",
    interval_s: float = 0.1,
) -> tuple[int, float, float, float]:
    """Run ``cmd`` (``env`` added to the environment, stdout + stderr into ``log``); return (exit
    code, wall s, ru_maxrss MB of its largest process, peak summed ``memory`` (pss | rss) MB of its
    tree sampled every ``interval_s`` s)."""
    import psutil

    t0 = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WANDB_MODE": "offline", **(env or {})},
        )
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        proc = psutil.Process(child.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_memory_mb(proc, memory))
            except psutil.NoSuchProcess:
                return
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024, peak[0]


def _size(text: str) -> tuple[int, int]:
    """ "4096" -> (4096, 4096); "100000x200000" -> (100000, 200000) (width x height)."""
    w, _, h = text.partition("x")
    try:
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (W or WxH)") from None


def cmd_rss(args: argparse.Namespace) -> dict[str, Any]:
    variants = {"default": {}}
    if args.malloc_threshold:
        variants[f"MALLOC_MMAP_THRESHOLD_={args.malloc_threshold}"] = {
            "MALLOC_MMAP_THRESHOLD_": str(args.malloc_threshold)
        }
    figures = []
    with tempfile.TemporaryDirectory(prefix="lnbench-") as tmp:
        root = Path(tmp)
        ckpt = root / "m.ckpt"
        write_checkpoint(ckpt, args.width, args.depth, args.patch_size)
        slides = []
        for w, h in args.sizes:
            path = root / f"slide_{w}x{h}.tif"
            fraction = min(1.0, args.tissue_mpx * 1e6 / (w * h)) if args.tissue_mpx else args.tissue
            t0 = time.perf_counter()
            write_bench_slide(path, w, h, tissue_fraction=fraction, cell=args.cell)
            with open_slide(path) as slide:
                settings = InferenceSettings()
                plan = plan_slide(
                    slide,
                    tissue_mask(slide),
                    patch_size=args.patch_size,
                    level=0,
                    settings=settings,
                )
            slides.append((f"{w}x{h}", path, len(plan.corners), plan.heatmap_shape))
            print(f"# wrote {w}x{h} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for _ in range(args.repeats):
            for variant, env in variants.items():
                for name, path, _, _ in slides:
                    cmd = [
                        sys.executable,
                        "-m",
                        "lymphnode.infer",
                        f"checkpoint={ckpt}",
                        f"slides=[{path}]",
                        f"out_dir={root / 'out'}",
                        "overwrite=true",  # every run does the whole slide
                        f"num_workers={args.workers}",
                        f"batch_size={args.batch_size}",
                        "device=cpu",
                        "progress=false",
                        "adapt_bn=false",  # one pass per slide, as the recorded figures
                    ]
                    log = root / "log.txt"
                    code, wall, maxrss, pss = run_measured(cmd, log, env)
                    if "1 done" not in log.read_text():
                        raise SystemExit(f"infer did not process {path}:\n{log.read_text()}")
                    if code != 0:
                        raise SystemExit(
                            f"infer failed on {path} (exit {code}):\n{log.read_text()}"
                        )
                    runs.setdefault((variant, name), []).append((wall, maxrss, pss))
    rows = []
    for variant in variants:
        first = None
        for name, _, tiles, shape in slides:
            rec = runs[(variant, name)]
            wall, maxrss, pss = (statistics.median(v[i] for v in rec) for i in range(3))
            first = first or (maxrss, pss)
            rows.append(
                [
                    variant,
                    name,
                    tiles,
                    f"{shape[1]}x{shape[0]}",
                    wall,
                    maxrss,
                    pss,
                    maxrss / first[0],
                    pss / first[1],
                ]
            )
            figures.append(
                {
                    "variant": variant,
                    "slide": name,
                    "tiles": tiles,
                    "heatmap": list(shape),
                    "wall_s": wall,
                    "maxrss_mb": maxrss,
                    "tree_pss_mb": pss,
                    "runs": rec,
                }
            )
    tissue = (
        f"{args.tissue_mpx:g} Mpx of tissue per slide"
        if args.tissue_mpx
        else f"{args.tissue:.0%} tissue"
    )
    print(f"\n## rss: python -m lymphnode.infer per slide size ({machine(torch.device('cpu'))})\n")
    print(
        f"{tissue} (cells of {args.cell} px), {args.patch_size}-px tiles, UNet width "
        f"{args.width} depth {args.depth}, batch {args.batch_size}, {args.workers} worker(s), "
        f"CPU, median of {args.repeats}; ratios against the first size\n"
    )
    print(
        table(
            [
                "allocator",
                "slide (level 0)",
                "tiles",
                "heatmap",
                "wall s",
                "max RSS MB (largest process)",
                "peak PSS MB (process tree)",
                "RSS ratio",
                "PSS ratio",
            ],
            rows,
        )
    )
    return {"rss": figures}


# --------------------------------------------------------------------------- slide (GPU)


def _random_batches(n: int, batch: int, patch: int, device: torch.device) -> list[torch.Tensor]:
    """``n`` distinct uint8 batches (B, P, P, 3), pinned when the model runs on a GPU."""
    g = torch.Generator().manual_seed(0)
    out = [
        torch.randint(0, 256, (batch, patch, patch, 3), generator=g, dtype=torch.uint8)
        for _ in range(n)
    ]
    return [b.pin_memory() for b in out] if device.type == "cuda" else out


def cmd_slide(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
    settings = InferenceSettings(
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        tta=args.tta,
        bf16=args.bf16,
        channels_last=args.channels_last,
        device=str(device),
    )
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lnb-")))
        root.mkdir(parents=True, exist_ok=True)
        return _slide(args, device, settings, root)


def _slide(
    args: argparse.Namespace, device: torch.device, settings: InferenceSettings, root: Path
) -> dict[str, Any]:
    from lymphnode.infer import run_inference
    from lymphnode.models.checkpoint import load_inference_model

    figures: dict[str, Any] = {"settings": settings.__dict__, "machine": machine(device)}
    # the same arguments give the same slide: a workdir that holds it is reused (GPU reruns)
    path = root / f"bench_{args.width}x{args.height}_t{args.tissue:g}_c{args.cell}.tif"
    t0 = time.perf_counter()
    if path.is_file():
        fraction = float(tissue_cells(args.width, args.height, args.cell, args.tissue, 0).mean())
        what = "reused"
    else:
        fraction = write_bench_slide(
            path, args.width, args.height, tissue_fraction=args.tissue, cell=args.cell
        )
        what = "written"
    figures["write_slide_s"] = time.perf_counter() - t0
    ckpt = root / "unet.ckpt"
    write_checkpoint(ckpt, args.model_width, args.depth, args.patch_size)
    print(
        f"# slide {path} ({args.width}x{args.height}, {fraction:.0%} tissue cells) {what} in "
        f"{figures['write_slide_s']:.0f} s",
        file=sys.stderr,
    )

    with open_slide(path) as slide:
        t0 = time.perf_counter()
        tissue = tissue_mask(slide)
        plan = plan_slide(slide, tissue, patch_size=args.patch_size, level=0, settings=settings)
        figures["tissue_and_grid_s"] = time.perf_counter() - t0
        n = len(plan.corners)
        figures["tiles"] = n
        print(
            f"# {n} tiles, tissue mask + grid {figures['tissue_and_grid_s']:.1f} s", file=sys.stderr
        )
        k = min(n, args.component_tiles)
        loaded = load_inference_model(ckpt)
        net, preprocess = loaded.task, loaded.preprocess
        # compute-only (first: warms CUDA and cuDNN's autotuning up for the e2e run)
        batches = _random_batches(4, args.batch_size, args.patch_size, device)
        xy = torch.from_numpy(plan.corners[: args.batch_size].copy())
        xy = torch.cat([xy] * math.ceil(args.batch_size / len(xy)))[: args.batch_size]
        n_batches = max(1, k // args.batch_size)
        stream = [(batches[i % len(batches)], xy) for i in range(n_batches)]
        for warm in (True, False):
            stitcher = HeatmapStitcher(
                plan.heatmap_shape,
                settings.downsample,
                1.0,
                args.patch_size,
                settings.blend,
                root / "c",
            )
            t0 = time.perf_counter()
            run_tiles(
                net,
                stream[:2] if warm else stream,
                stitcher,
                preprocess=preprocess,
                settings=settings,
            )
            _sync(device)
            seconds = time.perf_counter() - t0
        figures["compute_tiles_per_s"] = n_batches * args.batch_size / seconds
        shutil.rmtree(root / "c", ignore_errors=True)
        # read-only over the first k tiles, the loader predict_slide uses
        dataset = TileDataset(slide, plan.corners[:k], preprocess, args.patch_size)
        t0 = time.perf_counter()
        for _ in tile_loader(dataset, settings):
            pass
        figures["read_tiles_per_s"] = k / (time.perf_counter() - t0)
        bound = min(figures["compute_tiles_per_s"], figures["read_tiles_per_s"])
        figures["projected_min"] = (n / bound + figures["tissue_and_grid_s"]) / 60
        print(
            f"# compute-only {figures['compute_tiles_per_s']:.0f} tiles/s, read-only "
            f"{figures['read_tiles_per_s']:.0f} tiles/s",
            file=sys.stderr,
        )

    if not args.skip_e2e:
        t0 = time.perf_counter()
        status = run_inference(
            ckpt, [path], root / "out", settings=settings, overwrite=True, progress=False
        )
        _sync(device)
        figures["e2e_s"] = time.perf_counter() - t0
        if status.get(path.stem) != "done":
            raise SystemExit(f"run_inference failed: {status}")
    print(f"\n## slide: minutes per slide ({figures['machine']})\n")
    print(
        f"{args.width}x{args.height} level 0, {fraction:.0%} tissue cells of {args.cell} px, "
        f"{n} tiles of {args.patch_size} px at level 0, UNet width {args.model_width} depth "
        f"{args.depth} (random weights), batch {args.batch_size}, {args.workers} workers, "
        f"device {device}, bf16 {args.bf16}, channels_last {args.channels_last}, TTA "
        f"{args.tta}\n"
    )
    rows = [
        ["tissue mask + tile grid", f"{figures['tissue_and_grid_s']:.1f} s", ""],
        [
            f"compute-only ({n_batches * args.batch_size} random tiles)",
            f"{figures['compute_tiles_per_s']:.0f} tiles/s",
            f"{n / figures['compute_tiles_per_s'] / 60:.2f} min",
        ],
        [
            f"read-only (first {k} tiles, {args.workers} workers)",
            f"{figures['read_tiles_per_s']:.0f} tiles/s",
            f"{n / figures['read_tiles_per_s'] / 60:.2f} min",
        ],
        ["projected: grid + tiles / slower side", "", f"{figures['projected_min']:.2f} min"],
    ]
    if "e2e_s" in figures:
        rows.append(
            [
                "**end to end (run_inference: mask, tiles, heatmap TIFF, overlay)**",
                f"{n / figures['e2e_s']:.0f} tiles/s",
                f"**{figures['e2e_s'] / 60:.2f} min**",
            ]
        )
    print(table(["what", "rate", "for the whole slide"], rows))
    target = figures.get("e2e_s", figures["projected_min"] * 60) / 60
    print(f"\ntarget < 5 min per slide: {'met' if target < 5 else 'NOT met'} ({target:.2f} min)")
    return {"slide": figures}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, run: Callable[[argparse.Namespace], dict[str, Any]], help: str, **defaults: Any
    ) -> argparse.ArgumentParser:
        """A subcommand with the options all share (defaults per subcommand)."""
        p = sub.add_parser(name, help=help)
        p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
        p.add_argument(
            "--cell",
            type=int,
            default=defaults.get("cell", 512),
            help="tissue cell side, level-0 px (multiple of 256)",
        )
        p.add_argument(
            "--tissue",
            type=float,
            default=defaults.get("tissue", 0.3),
            help="fraction of the slide's cells that hold tissue",
        )
        p.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 16))
        p.add_argument(
            "--patch-size",
            type=int,
            default=defaults.get("patch_size", 256),
            help="tile side, level-0 px",
        )
        p.add_argument("--repeats", type=int, default=defaults.get("repeats", 3))
        p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
        p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
        p.set_defaults(run=run)
        return p

    p = command("overlap", cmd_overlap, "tiles/s and read/compute overlap", tissue=0.5)
    p.add_argument("--size", type=int, default=4096, help="slide width (height: half), px")
    p.add_argument("--width", type=int, default=8, help="UNet base width")
    p.add_argument("--depth", type=int, default=3, help="UNet depth")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--configs",
        default="auto:0,auto:1,auto:2,2:1",
        help="THREADS:WORKERS,... (THREADS 'auto' = InferenceSettings' default)",
    )

    p = command("rss", cmd_rss, "peak RSS per slide size", repeats=2, batch_size=32, tissue=0.1)
    p.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=[_size("4096"), _size("16384")],
        help="slide sizes, W or WxH level-0 px (e.g. 100000x200000)",
    )
    p.add_argument(
        "--tissue-mpx",
        type=float,
        default=16.0,
        help="tissue area per slide, level-0 megapixels: the same tiles on every size (0: use "
        "--tissue, a fraction of each slide)",
    )
    p.add_argument(
        "--malloc-threshold",
        type=int,
        default=0,
        help="also run with MALLOC_MMAP_THRESHOLD_=BYTES (glibc; 0: don't)",
    )
    p.add_argument("--width", type=int, default=4, help="UNet base width")
    p.add_argument("--depth", type=int, default=2, help="UNet depth")
    p.add_argument("--workers", type=int, default=1)

    p = command(
        "slide",
        cmd_slide,
        "minutes per CAMELYON-sized slide",
        cell=4096,
        patch_size=300,
        batch_size=64,
        repeats=1,
    )
    p.add_argument("--width", type=int, default=100_000, help="slide width, level-0 px")
    p.add_argument("--height", type=int, default=200_000, help="slide height, level-0 px")
    p.add_argument("--model-width", type=int, default=64, help="UNet base width")
    p.add_argument("--depth", type=int, default=4, help="UNet depth")
    p.add_argument("--workers", type=int, default=max(1, available_cpus() - 2))
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", action="store_true", help="8-way D4 test-time augmentation")
    p.add_argument(
        "--component-tiles",
        type=int,
        default=8192,
        help="tiles for the read-only and compute-only rates",
    )
    p.add_argument("--skip-e2e", action="store_true", help="components only (no end-to-end run)")
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the slide and outputs go (default: a temporary folder, removed)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="CPU dry run: 4096x8192 slide, UNet width 8 depth 3, 64 component tiles",
    )

    args = parser.parse_args()
    if getattr(args, "tiny", False):
        args.width, args.height, args.cell = 4096, 8192, 1024
        args.model_width, args.depth, args.batch_size = 8, 3, 16
        args.component_tiles, args.workers = 64, min(args.workers, 1)
    figures = args.run(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()

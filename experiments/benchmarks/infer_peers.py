"""Whole-slide inference against the peers: lymphnode vs MONAI vs tiatoolbox on the same work.

The same UNet checkpoint (a lymphnode checkpoint, random weights: speed does not depend on them)
over the same synthetic slide (:func:`infer.write_bench_slide`, a pyramidal JPEG TIFF), the same
tiles (``--patch-size`` px at level 0 every ``--stride`` px, the ones that touch lymphnode's tissue
mask), the same heatmap grid (``--downsample`` level-0 px per heatmap px), on the CPU with the
same torch threads and DataLoader workers:

``lymphnode``  :func:`lymphnode.inference.predict.predict_slide` — the library call that
    ``python -m lymphnode.infer`` makes per slide (tile grid from the tissue mask, DataLoader
    workers, normalisation on the device, channels-last fp32 model, stitching on the device into
    memory-mapped sums, the heatmap array). Not the CLI: its start-up, the tissue mask and the
    heatmap TIFF / overlay are outside the timed region (as for the peers).
``monai``  ``monai.data.PatchWSIDataset`` (OpenSlide backend) over lymphnode's tile list,
    ``monai.data.DataLoader``, normalisation in the main process, ``monai.inferers.
    SlidingWindowInferer`` (roi = the tile, one window per tile, ``sw_batch_size`` = the batch)
    on the fp32 NCHW model, and a NumPy block average of each tile into the heatmap grid.
    ``MaskedPatchWSIDataset`` cannot be used: it always computes its own tissue mask
    (``ForegroundMask(hsv_threshold={"S": "otsu"})`` of the level ``mask_level`` image, no
    argument takes a mask) and puts one tile on every mask pixel, so it needs a pyramid level
    whose downsample is the stride (256 here; the slides have levels down to 1/16).
``monai-cl``  The same with the model converted to channels-last (what lymphnode does for its
    model): separates the memory-format gain from the rest.
``tiatoolbox``  ``SemanticSegmentor.run(patch_mode=False)`` with an ``IOSegmentorConfig`` of the
    same tile and stride at level 0 (``baseline`` 1.0), the model wrapped in a ``ModelABC``
    (normalisation inside ``infer_batch``), ``masks=[M]`` where ``M`` is the tile grid (one px per
    tile, 1 where lymphnode reads that tile — tiatoolbox reads the tiles whose footprint touches
    the mask, so it reads exactly lymphnode's), its zarr output (the full-resolution probability
    canvas) block-averaged into the heatmap grid. Runs under ``--tia-python`` (a separate venv:
    tiatoolbox 2.1.3 pins torch < 2.13, see the README); skipped with the reason when absent.

Every run is its own process (``python infer_peers.py child ...``) so that its peak RSS is its
own: psutil samples the summed RSS of the process and its DataLoader workers every 20 ms, and
``ru_maxrss`` of the largest process comes from ``wait4``. The peers alternate within each repeat
(the order rotates) and the tables give medians; the load average is recorded around every run.
Timed region (``core s``): from the opened slide and loaded model to the heatmap array in
memory; ``process s`` adds interpreter start, imports, checkpoint load and tissue mask.

    .venv/bin/python experiments/benchmarks/infer_peers.py --tia-python /work/venv-tia/bin/python
    .venv/bin/python experiments/benchmarks/infer_peers.py --size 8192 --repeats 5 --json peers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # infer.py: the bench slide and checkpoint writers

from infer import bench_model, machine, run_measured, table, write_bench_slide  # noqa: E402

from lymphnode.core.errors import ConfigError  # noqa: E402

PEERS = ("lymphnode", "monai", "monai-cl", "tiatoolbox")
DEFAULT_PEERS = ("lymphnode", "monai", "tiatoolbox")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every peer runs on: the slide, the checkpoint, the tiles and the heatmap grid.

    Attributes:
        slide: the pyramidal TIFF (level 0: ``size`` x ``size`` px).
        checkpoint: the lymphnode checkpoint of the UNet.
        corners: ``.npy`` of the (N, 2) int64 level-0 (x, y) top-left corners of the tiles
            (lymphnode's tile grid over its tissue mask, row by row).
        tile_mask: ``.npy`` of the (rows, cols) uint8 tile grid, 1 where a tile is read; grid
            cell (r, c) is the tile at level-0 (c * stride, r * stride).
        patch_size, stride: tile side and step, level-0 px.
        downsample: level-0 px per heatmap px; the heatmap is (size / downsample) square.
        batch_size, workers, threads: DataLoader batch and workers, torch intra-op threads.
    """

    slide: str
    checkpoint: str
    corners: str
    tile_mask: str
    size: int
    patch_size: int
    stride: int
    downsample: int
    batch_size: int
    workers: int
    threads: int

    @property
    def heatmap_shape(self) -> tuple[int, int]:
        """(rows, cols) of the heatmap grid."""
        n = self.size // self.downsample
        return n, n

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(dataclasses.asdict(self)))
        return path

    @classmethod
    def load(cls, path: Path) -> Setup:
        return cls(**json.loads(path.read_text()))


def check_geometry(size: int, patch_size: int, stride: int, downsample: int) -> None:
    """ConfigError unless the tiles tile the slide exactly and sit on the heatmap grid: the
    peers' stitching (a block average per tile) is then exactly lymphnode's ``mean`` blend."""
    for name, value in (("patch_size", patch_size), ("stride", stride)):
        if value <= 0 or value % downsample:
            raise ConfigError(
                f"{name}={value} must be a positive multiple of downsample={downsample} (level-0 "
                "px): the peers average whole heatmap cells per tile"
            )
    if stride > patch_size:
        raise ConfigError(f"stride={stride} must be <= patch_size={patch_size} (level-0 px)")
    if size < patch_size or (size - patch_size) % stride:
        raise ConfigError(
            f"size={size} must be patch_size={patch_size} + a multiple of stride={stride} "
            "(level-0 px), so that no tile sticks out of the slide"
        )


def prepare(
    work: Path,
    *,
    size: int = 4096,
    tissue: float = 0.3,
    cell: int = 512,
    patch_size: int = 256,
    stride: int | None = None,
    downsample: int = 32,
    width: int = 8,
    depth: int = 3,
    batch_size: int = 16,
    workers: int = 1,
    threads: int = 1,
    seed: int = 0,
) -> Setup:
    """Write the slide (``size`` x ``size`` level-0 px, ``tissue`` of its ``cell``-px cells hold
    tissue), the checkpoint (UNet ``width`` / ``depth``, random weights, tile ``patch_size``) and
    lymphnode's tiles over its tissue mask (:func:`lymphnode.inference.grid.plan_slide`) into
    ``work``; reuses a slide that is already there."""
    from lymphnode.inference.grid import plan_slide
    from lymphnode.inference.settings import InferenceSettings
    from lymphnode.wsi.slide import open_slide
    from lymphnode.wsi.tissue import tissue_mask

    stride = stride or patch_size
    check_geometry(size, patch_size, stride, downsample)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"peers_{size}_t{tissue:g}_c{cell}_s{seed}.tif"
    if not slide.is_file():
        write_bench_slide(slide, size, size, tissue_fraction=tissue, cell=cell, seed=seed)
    ckpt = work / f"unet_w{width}_d{depth}_p{patch_size}.ckpt"
    settings = InferenceSettings(patch_size=patch_size, stride=stride, downsample=downsample)
    with open_slide(slide) as handle:
        plan = plan_slide(
            handle, tissue_mask(handle), patch_size=patch_size, level=0, settings=settings
        )
        if not len(plan.corners):
            raise ConfigError(f"the slide {slide} has no tissue tile (tissue={tissue})")
        sample = np.stack(
            [handle.read(int(x), int(y), patch_size, patch_size) for x, y in plan.corners[:8]]
        )
    write_spread_checkpoint(ckpt, width, depth, patch_size, sample)
    n = (size - patch_size) // stride + 1
    grid = np.zeros((n, n), np.uint8)
    grid[plan.corners[:, 1] // stride, plan.corners[:, 0] // stride] = 1
    np.save(work / "corners.npy", plan.corners)
    np.save(work / "tile_mask.npy", grid)
    return Setup(
        slide=str(slide),
        checkpoint=str(ckpt),
        corners=str(work / "corners.npy"),
        tile_mask=str(work / "tile_mask.npy"),
        size=size,
        patch_size=patch_size,
        stride=stride,
        downsample=downsample,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
    )


def write_spread_checkpoint(
    path: Path, width: int, depth: int, patch_size: int, sample: np.ndarray, spread: float = 2.0
) -> None:
    """A lymphnode checkpoint (as the task modules save it) of a randomly initialised UNet whose
    segmentation head is rescaled so that its logits on ``sample`` (B, P, P, 3) uint8 tiles have
    mean 0 and std ``spread``: a random UNet's probabilities are otherwise ~0.5 everywhere, and
    a near-constant heatmap would make the agreement check vacuous. Same seed, same weights."""
    import torch

    torch.manual_seed(0)
    module, preprocess = bench_model(width, depth, patch_size)
    with torch.no_grad():
        logits = module.net(preprocess.normalize(torch.from_numpy(sample))).seg  # (B, 1, P, P)
        gain = spread / float(logits.std())
        head = module.net.seg_head
        head.weight.mul_(gain)
        head.bias.sub_(float(logits.mean())).mul_(gain)
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)


# --------------------------------------------------------------------------- stitching (peers)


def add_tile_blocks(
    sums: np.ndarray, counts: np.ndarray, probs: np.ndarray, corners: np.ndarray, downsample: int
) -> None:
    """Add tiles ``probs`` (B, P, P) with level-0 (x, y) corners ``corners`` (B, 2) into the
    heatmap sums / counts (rows, cols): each tile's mean over every ``downsample``² block goes to
    the heatmap cell under it (corners and P multiples of ``downsample``)."""
    b, p, _ = probs.shape
    k = p // downsample
    blocks = probs.reshape(b, k, downsample, k, downsample).mean(axis=(2, 4), dtype=np.float64)
    for (x, y), block in zip(np.asarray(corners).tolist(), blocks):
        r, c = y // downsample, x // downsample
        sums[r : r + k, c : c + k] += block
        counts[r : r + k, c : c + k] += 1


def heatmap_from_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float32 heatmap: sums / counts, 0 where no tile was read (as lymphnode's)."""
    out = np.zeros(sums.shape, np.float32)
    np.divide(sums, counts, out=out, where=counts > 0, casting="unsafe")
    return out


def canvas_to_heatmap(canvas: Any, downsample: int, rows_per_chunk: int = 64) -> np.ndarray:
    """Block average of a full-resolution (H, W) or (H, W, 1) probability canvas (NumPy, zarr or
    dask; H, W multiples of ``downsample``) into the (H / d, W / d) heatmap grid, read in chunks
    of heatmap rows."""
    h, w = canvas.shape[:2]
    rows, cols = h // downsample, w // downsample
    out = np.zeros((rows, cols), np.float32)
    for r in range(0, rows, rows_per_chunk):
        r1 = min(r + rows_per_chunk, rows)
        chunk = np.asarray(canvas[r * downsample : r1 * downsample])
        chunk = chunk.reshape(chunk.shape[0], w, -1)[..., 0].astype(np.float64)
        out[r:r1] = chunk.reshape(r1 - r, downsample, cols, downsample).mean(axis=(1, 3))
    return out


# --------------------------------------------------------------------------- the peers


def _load_model(setup: Setup) -> Any:
    from lymphnode.models.checkpoint import load_inference_model

    return load_inference_model(setup.checkpoint)


def run_lymphnode(setup: Setup, work: Path) -> tuple[np.ndarray, float, int]:
    """lymphnode's ``predict_slide`` (what ``infer`` runs per slide); returns (heatmap, core s,
    tiles)."""
    from lymphnode.inference.predict import predict_slide
    from lymphnode.inference.settings import InferenceSettings
    from lymphnode.wsi.slide import open_slide
    from lymphnode.wsi.tissue import tissue_mask

    loaded = _load_model(setup)
    settings = InferenceSettings(
        patch_size=setup.patch_size,
        stride=setup.stride,
        downsample=float(setup.downsample),
        batch_size=setup.batch_size,
        num_workers=setup.workers,
        num_threads=setup.threads,
        device="cpu",
    )
    with open_slide(Path(setup.slide)) as slide:
        tissue = tissue_mask(slide)
        t0 = time.perf_counter()
        heat = predict_slide(
            loaded.task, loaded.preprocess, slide, tissue, settings=settings,
            workdir=work / "lymphnode", progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    return heat.probabilities, seconds, len(np.load(setup.corners))


def run_monai(
    setup: Setup, work: Path, *, channels_last: bool = False
) -> tuple[np.ndarray, float, int]:
    """MONAI ``PatchWSIDataset`` + ``DataLoader`` + ``SlidingWindowInferer`` over lymphnode's
    tiles, block-averaged into the heatmap grid; returns (heatmap, core s, tiles)."""
    import torch
    from monai.data import DataLoader, PatchWSIDataset
    from monai.inferers import SlidingWindowInferer

    loaded = _load_model(setup)
    model = loaded.task.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean = torch.tensor(loaded.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(loaded.preprocess.std).view(1, 3, 1, 1) * 255
    p = setup.patch_size
    torch.set_num_threads(setup.threads)
    t0 = time.perf_counter()
    corners = np.load(setup.corners)
    data = [{"image": setup.slide, "location": (int(y), int(x))} for x, y in corners]  # (row, col)
    dataset = PatchWSIDataset(
        data,
        patch_size=p,
        patch_level=0,
        include_label=False,
        center_location=False,
        reader="OpenSlide",
    )
    loader = DataLoader(
        dataset, batch_size=setup.batch_size, num_workers=setup.workers, shuffle=False
    )
    inferer = SlidingWindowInferer(
        roi_size=(p, p), sw_batch_size=setup.batch_size, overlap=0.0, progress=False
    )
    sums = np.zeros(setup.heatmap_shape, np.float64)
    counts = np.zeros(setup.heatmap_shape, np.int32)
    start = 0
    with torch.inference_mode():
        for batch in loader:
            x = (batch["image"].as_tensor().float() - mean) / std  # (B, 3, P, P)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            probs = inferer(x, model.probabilities)[:, 0].numpy()  # (B, P, P)
            add_tile_blocks(
                sums, counts, probs, corners[start : start + len(probs)], setup.downsample
            )
            start += len(probs)
    heat = heatmap_from_sums(sums, counts)
    return heat, time.perf_counter() - t0, start


def run_tiatoolbox(setup: Setup, work: Path) -> tuple[np.ndarray, float, int]:
    """tiatoolbox ``SemanticSegmentor`` over the slide with the tile grid as its mask, its
    probability canvas block-averaged into the heatmap grid; returns (heatmap, core s, tiles)."""
    import shutil

    import torch
    import zarr
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.models.models_abc import ModelABC

    if setup.stride != setup.patch_size:
        raise ConfigError(
            f"tiatoolbox: stride={setup.stride} != patch_size={setup.patch_size}: the tile-grid "
            "mask selects exactly lymphnode's tiles only without overlap"
        )
    loaded = _load_model(setup)

    class Wrapped(ModelABC):
        """The task module as a tiatoolbox model: uint8 NHWC in, probabilities NHWC out."""

        def __init__(self) -> None:
            super().__init__()
            self.task = loaded.task
            self.register_buffer("mean", torch.tensor(loaded.preprocess.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(loaded.preprocess.std).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.task.probabilities((x / 255 - self.mean) / self.std)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: Any, device: str) -> np.ndarray:
            model.eval()
            x = torch.as_tensor(batch_data).to(device=device, dtype=torch.float32)
            with torch.inference_mode():
                probs = model(x.permute(0, 3, 1, 2))  # (B, 1, P, P)
            return probs.permute(0, 2, 3, 1).cpu().numpy()  # (B, P, P, 1)

    p = setup.patch_size
    level0 = [{"units": "baseline", "resolution": 1.0}]
    ioconfig = IOSegmentorConfig(
        input_resolutions=level0,
        output_resolutions=level0,
        patch_input_shape=(p, p),
        patch_output_shape=(p, p),
        stride_shape=(setup.stride, setup.stride),
    )
    torch.set_num_threads(setup.threads)
    out_dir = work / "tiatoolbox"
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    segmentor = SemanticSegmentor(
        model=Wrapped(), batch_size=setup.batch_size, num_workers=setup.workers, device="cpu",
        verbose=False,
    )  # fmt: skip
    outputs = segmentor.run(
        [Path(setup.slide)], masks=[np.load(setup.tile_mask)], patch_mode=False,
        ioconfig=ioconfig, save_dir=out_dir, overwrite=True, output_type="zarr",
        return_probabilities=True,
    )  # fmt: skip
    store = zarr.open(str(outputs[Path(setup.slide)]), mode="r")
    heat = canvas_to_heatmap(store["probabilities"], setup.downsample)
    seconds = time.perf_counter() - t0
    return heat, seconds, int(store["coordinates"].shape[0])


RUNNERS = {
    "lymphnode": run_lymphnode,
    "monai": run_monai,
    "monai-cl": lambda setup, work: run_monai(setup, work, channels_last=True),
    "tiatoolbox": run_tiatoolbox,
}


def cpu_seconds() -> float:
    """User + system CPU s of this process, its reaped children and its live children (the
    DataLoader workers, which the peers start and stop inside the timed region)."""
    import resource

    import psutil

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def run_peer(peer: str, setup: Setup, work: Path) -> dict[str, Any]:
    """Run one peer in this process with ``setup.threads`` torch threads (restored after);
    returns {"heatmap": (rows, cols) float32, "seconds": core s, "tiles": N, "threads": T,
    "cpu_s": CPU s of the process and its workers over the whole call}."""
    import torch

    if peer not in RUNNERS:
        raise ConfigError(f"peer={peer!r} is not one of {', '.join(PEERS)}")
    old = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        cpu0 = cpu_seconds()
        heat, seconds, tiles = RUNNERS[peer](setup, work)
        cpu = cpu_seconds() - cpu0
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    return {"heatmap": heat, "seconds": seconds, "tiles": tiles, "threads": threads, "cpu_s": cpu}


def agreement(heat: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Max and mean absolute difference of two heatmaps of one grid, and the number of cells
    covered by one but not the other (0 where no tile was read)."""
    if heat.shape != reference.shape:
        raise ConfigError(f"heatmap shape {heat.shape} != reference {reference.shape}")
    diff = np.abs(heat.astype(np.float64) - reference.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "coverage_mismatch": int(((heat > 0) != (reference > 0)).sum()),
    }


# --------------------------------------------------------------------------- processes


def child_main(args: argparse.Namespace) -> None:
    """One peer in this process: writes the heatmap (.npy) and the figures (.json)."""
    setup = Setup.load(args.setup)
    result = run_peer(args.peer, setup, args.out.parent)
    np.save(args.out.with_suffix(".npy"), result.pop("heatmap"))
    args.out.write_text(json.dumps(result))


def run_child(peer: str, setup_file: Path, out: Path, python: str) -> dict[str, Any]:
    """Run one peer in a fresh ``python`` process; its figures plus process wall s, peak summed
    RSS of its tree (psutil, every 20 ms), ru_maxrss of its largest process and the load
    average before and after."""

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(Setup.load(setup_file).threads),
        "WANDB_MODE": "offline",
    }
    cmd = [python, str(Path(__file__).resolve()), "child", peer, "--setup", str(setup_file)]
    cmd += ["--out", str(out)]
    load0 = os.getloadavg()[0]
    log = out.with_suffix(".log")
    code, wall, maxrss, peak = run_measured(cmd, log, env, memory="rss", interval_s=0.02)
    if code != 0:
        raise RuntimeError(f"{peer} failed (exit {code}):\n{log.read_text()[-3000:]}")
    result = json.loads(out.read_text())
    result.update(
        process_s=wall,
        peak_rss_mb=peak,
        maxrss_mb=maxrss,
        load=(load0, os.getloadavg()[0]),
    )
    return result


def tia_unavailable(python: str | None) -> str | None:
    """Why tiatoolbox cannot run under ``python`` (None: it can)."""
    if not python:
        return "no --tia-python given (tiatoolbox is not a dependency; see the README)"
    if not Path(python).is_file():
        return f"--tia-python {python} does not exist"
    probe = subprocess.run(
        [
            python,
            "-c",
            "import tiatoolbox, torch; print(tiatoolbox.__version__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        return f"{python} cannot import tiatoolbox: {probe.stderr.strip().splitlines()[-1]}"
    return None


def versions(tia_python: str | None) -> str:
    """Package versions of the compared runs."""
    import monai
    import torch

    text = f"torch {torch.__version__}, MONAI {monai.__version__}"
    if tia_python and not tia_unavailable(tia_python):
        out = subprocess.run(
            [tia_python, "-c", "import tiatoolbox; print(tiatoolbox.__version__)"],
            capture_output=True,
            text=True,
        )
        text += f", tiatoolbox {out.stdout.strip()} (same torch, separate venv)"
    return text


def bench(args: argparse.Namespace) -> dict[str, Any]:
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown or "lymphnode" not in peers:
        raise SystemExit(f"--peers {args.peers}: expected lymphnode plus any of {PEERS}")
    skipped: dict[str, str] = {}
    if "tiatoolbox" in peers:
        why = tia_unavailable(args.tia_python)
        if why:
            skipped["tiatoolbox"] = why
            peers.remove("tiatoolbox")
    work = args.work or Path(tempfile.mkdtemp(prefix="lnpeers-"))
    setup = prepare(
        work,
        size=args.size,
        tissue=args.tissue,
        cell=args.cell,
        patch_size=args.patch_size,
        stride=args.stride,
        downsample=args.downsample,
        width=args.width,
        depth=args.depth,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
    )
    setup_file = setup.save(work / "setup.json")
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in peers}
    heatmaps: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        order = peers[r % len(peers) :] + peers[: r % len(peers)]  # rotate: no fixed position
        for peer in order:
            out = work / f"{peer}_{r}.json"
            python = args.tia_python if peer == "tiatoolbox" else sys.executable
            res = run_child(peer, setup_file, out, python)
            heatmaps[peer] = np.load(out.with_suffix(".npy"))
            runs[peer].append(res)
            print(
                f"# repeat {r} {peer}: {res['tiles']} tiles, core {res['seconds']:.2f} s, "
                f"process {res['process_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB, "
                f"load {res['load'][0]:.1f}",
                file=sys.stderr,
            )
    reference = heatmaps["lymphnode"]
    covered = reference[reference > 0]
    figures: dict[str, Any] = {
        "machine": machine(__import__("torch").device("cpu")),
        "versions": versions(args.tia_python),
        "setup": dataclasses.asdict(setup),
        "skipped": skipped,
        "heatmap_range": [float(covered.min()), float(covered.max())],
        "peers": {},
    }
    for peer in peers:
        rec = runs[peer]
        med = {k: statistics.median(x[k] for x in rec) for k in
               ("seconds", "cpu_s", "process_s", "peak_rss_mb", "maxrss_mb")}  # fmt: skip
        loads = [v for x in rec for v in x["load"]]
        figures["peers"][peer] = {
            **med,
            "tiles": rec[0]["tiles"],
            "threads": rec[0]["threads"],
            "tiles_per_s": rec[0]["tiles"] / med["seconds"],
            "tiles_per_cpu_s": rec[0]["tiles"] / med["cpu_s"],
            "load_range": [min(loads), max(loads)],
            "agreement": agreement(heatmaps[peer], reference),
            "runs": rec,
        }
    others = [p for p in peers if p != "lymphnode"]
    if others:
        fastest = max(others, key=lambda p: figures["peers"][p]["tiles_per_s"])
        ours = figures["peers"]["lymphnode"]
        ratio = ours["tiles_per_s"] / figures["peers"][fastest]["tiles_per_s"]
        cheapest = max(others, key=lambda p: figures["peers"][p]["tiles_per_cpu_s"])
        cpu_ratio = ours["tiles_per_cpu_s"] / figures["peers"][cheapest]["tiles_per_cpu_s"]
        figures.update(faster_peer=fastest, ratio=ratio, cheaper_peer=cheapest, cpu_ratio=cpu_ratio)
    report(figures, args)
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return figures


def report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    s = figures["setup"]
    print(f"\n## infer_peers ({figures['machine']})\n")
    print(
        f"{figures['versions']}. Slide {s['size']}² level 0, {args.tissue:.0%} tissue cells of "
        f"{args.cell} px; {s['patch_size']}-px tiles every {s['stride']} px at level 0 (the tiles "
        f"touching lymphnode's tissue mask), heatmap at downsample {s['downsample']}; UNet width "
        f"{args.width} depth {args.depth} (random weights; heatmap values "
        f"{figures['heatmap_range'][0]:.3f}–{figures['heatmap_range'][1]:.3f}), batch "
        f"{s['batch_size']}, {s['workers']} DataLoader worker(s), {s['threads']} torch "
        f"thread(s), CPU, fp32; median of {args.repeats}, peers interleaved\n"
    )
    rows = []
    for peer, f in figures["peers"].items():
        a = f["agreement"]
        rows.append(
            [
                peer,
                f["tiles"],
                f"{f['tiles_per_s']:.1f}",
                f"{f['tiles_per_cpu_s']:.1f}",
                f"{f['seconds']:.2f}",
                f"{f['process_s']:.1f}",
                f"{f['peak_rss_mb']:.0f}",
                f"{f['maxrss_mb']:.0f}",
                f"{a['max_abs_diff']:.1e}" if peer != "lymphnode" else "(reference)",
                a["coverage_mismatch"],
                f"{f['load_range'][0]:.1f}–{f['load_range'][1]:.1f}",
            ]
        )
    print(
        table(
            [
                "peer",
                "tiles",
                "tiles/s",
                "tiles per CPU-s",
                "core s",
                "process s",
                "peak RSS MB (tree)",
                "max RSS MB (largest)",
                "max abs diff vs lymphnode",
                "cells covered differently",
                "load avg",
            ],
            rows,
        )
    )
    if "ratio" in figures:
        print(
            f"\nlymphnode / fastest peer ({figures['faster_peer']}): {figures['ratio']:.2f}× "
            f"(target ≥ 1.5×: {'met' if figures['ratio'] >= 1.5 else 'NOT met'}); per CPU-s vs "
            f"{figures['cheaper_peer']}: {figures['cpu_ratio']:.2f}×"
        )
    for peer, why in figures["skipped"].items():
        print(f"\n{peer} skipped: {why}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child", help="(internal) run one peer in this process")
    child.add_argument("peer", choices=PEERS)
    child.add_argument("--setup", type=Path, required=True)
    child.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"any of {PEERS}")
    parser.add_argument(
        "--tia-python",
        default=os.environ.get("LYMPHNODE_TIA_PYTHON"),
        help="python of a venv with tiatoolbox (default $LYMPHNODE_TIA_PYTHON)",
    )
    parser.add_argument("--size", type=int, default=4096, help="slide side, level-0 px")
    parser.add_argument("--tissue", type=float, default=0.3, help="fraction of tissue cells")
    parser.add_argument("--cell", type=int, default=512, help="tissue cell side, level-0 px")
    parser.add_argument("--patch-size", type=int, default=256, help="tile side, level-0 px")
    parser.add_argument("--stride", type=int, default=None, help="level-0 px (default: tile)")
    parser.add_argument("--downsample", type=int, default=32, help="level-0 px per heatmap px")
    parser.add_argument("--width", type=int, default=8, help="UNet base width")
    parser.add_argument("--depth", type=int, default=3, help="UNet depth")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers, every peer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every peer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, help="keep the slide and outputs here")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.command == "child":
        child_main(args)
        return
    figures = bench(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()

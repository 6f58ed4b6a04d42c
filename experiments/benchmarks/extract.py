"""Patch extraction benchmark: ``lymphnode.prepare`` vs a bare OpenSlide loop vs MONAI.

On synthetic slides (lymphnode.synth, made once under ``--work``), for the same patch coordinates:

1. ``prepare`` (1 worker): building an unlabeled raw cache, everything included (process start,
   tissue masks, sampling, reads, writing, manifest) — its coordinates are then used by:
2. a bare ``openslide.OpenSlide.read_region`` loop (one handle per slide, one process);
3. MONAI ``PatchWSIDataset`` with the OpenSlide backend (one process, ``ds[i]`` for every patch);
4. ``prepare`` with 2 workers (same config, so the same patches);
5. peak RSS of ``python -m lymphnode.prepare`` (parent + workers, sampled with psutil) building
   from 8 slides vs from 2 of them (same patches per slide).

The methods alternate within each repeat (so machine load hits them alike); the table shows
medians over ``--repeats``. Run: ``.venv/bin/python experiments/benchmarks/extract.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def make_slides(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` synthetic slides (half tumor) of ``size``² px in ``folder``/slides (reused if there)."""
    from lymphnode.synth import make_slide

    paths = []
    for i in range(n):
        name = f"tumor_{i + 1:03d}" if i % 2 == 0 else f"normal_{i + 1:03d}"
        path = folder / "slides" / f"{name}.tif"
        if not path.exists():
            xml = folder / "annotations" / f"{name}.xml" if name.startswith("tumor") else None
            make_slide(
                path, seed=1000 + i, tumor=xml is not None, size=(size, size), annotation_path=xml
            )
        paths.append(path)
    return paths


def prepare_config(root: Path, cache_dir: Path, per_slide: int, patch: int, workers: int) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(
            "prepare",
            overrides=[
                f"paths.root={root}",
                f"paths.cache_dir={cache_dir}",
                "caches=[unlabeled]",
                "split.test_slides=[]",
                f"counts.unlabeled={per_slide}",
                f"patch_size={patch}",
                "level=0",
                "codec=raw",
                f"workers={workers}",
            ],
        )


Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process and its children)


def clock() -> Timing:
    """Wall time and user + system CPU time of this process and its reaped children (workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return time.perf_counter(), me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def since(start: Timing) -> Timing:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def time_prepare(root: Path, cache_dir: Path, per_slide: int, patch: int, workers: int) -> Timing:
    """prepare's own work (pool start, tissue, sampling, reads, writes, manifests), no CLI start."""
    from lymphnode.prepare import run

    cfg = prepare_config(root, cache_dir, per_slide, patch, workers)
    start = clock()
    run(cfg)
    return since(start)


def coordinates(cache_dir: Path, slides: dict[str, Path]) -> list[tuple[Path, int, int]]:
    from lymphnode.patches.cache import PatchCache

    index = PatchCache(cache_dir / "unlabeled").index
    return [
        (slides[str(s)], int(x), int(y)) for s, x, y in zip(index["slide"], index["x"], index["y"])
    ]


def time_openslide(coords: list[tuple[Path, int, int]], patch: int) -> Timing:
    import openslide

    start = clock()
    handle, current = None, None
    for path, x, y in coords:
        if path != current:
            if handle is not None:
                handle.close()
            handle, current = openslide.OpenSlide(str(path)), path
        handle.read_region((x, y), 0, (patch, patch))
    if handle is not None:
        handle.close()
    return since(start)


def monai_dataset(coords: list[tuple[Path, int, int]], patch: int) -> Any:
    from monai.data import PatchWSIDataset

    data = [{"image": str(p), "location": (y, x), "label": 0} for p, x, y in coords]  # (row, col)
    return PatchWSIDataset(
        data,
        patch_size=patch,
        patch_level=0,
        include_label=False,
        center_location=False,
        reader="OpenSlide",
    )


def time_monai(coords: list[tuple[Path, int, int]], patch: int) -> Timing:
    dataset = monai_dataset(coords, patch)
    start = clock()
    for i in range(len(dataset)):
        dataset[i]
    return since(start)


def check_same_pixels(cache_dir: Path, coords: list[tuple[Path, int, int]], patch: int) -> None:
    """The three methods read the same pixels at the same coordinates (first 5 patches)."""
    import openslide

    from lymphnode.patches.cache import PatchCache

    cache = PatchCache(cache_dir / "unlabeled")
    dataset = monai_dataset(coords, patch)
    for i in range(min(5, len(coords))):
        path, x, y = coords[i]
        with openslide.OpenSlide(str(path)) as osr:
            bare = np.asarray(osr.read_region((x, y), 0, (patch, patch)))[..., :3]
        ours = cache[i][0]
        theirs = np.asarray(dataset[i]["image"]).transpose(1, 2, 0)[..., :3]
        if not (np.array_equal(ours, bare) and np.array_equal(bare, theirs)):
            raise SystemExit(f"patch {i} of {path.name} at ({x}, {y}) differs between methods")


def peak_rss(root: Path, cache_dir: Path, per_slide: int, patch: int, workers: int) -> int:
    """Peak summed RSS (bytes) of the prepare CLI and its worker processes."""
    import psutil

    cmd = [
        sys.executable,
        "-m",
        "lymphnode.prepare",
        f"paths.root={root}",
        f"paths.cache_dir={cache_dir}",
        "caches=[unlabeled]",
        "split.test_slides=[]",
        f"counts.unlabeled={per_slide}",
        f"patch_size={patch}",
        "codec=raw",
        f"workers={workers}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    parent = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {err.decode()[-2000:]}")
    return peak


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process (so MONAI's torch import never meets prepare's pool)."""
    coords = (
        [(Path(p), int(x), int(y)) for p, x, y in json.loads(args.coords.read_text())]
        if args.coords
        else []
    )
    timing: Timing = (0.0, 0.0)
    if args.child == "prepare":
        timing = time_prepare(args.root, args.cache, args.per_slide, args.patch, args.workers)
    elif args.child == "openslide":
        timing = time_openslide(coords, args.patch)
    elif args.child == "monai":
        timing = time_monai(coords, args.patch)
    else:
        check_same_pixels(args.cache, coords, args.patch)
    print(json.dumps({"seconds": timing[0], "cpu": timing[1]}))


def measure(what: str, args: argparse.Namespace, **extra: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one measurement in a child process."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--patch",
        str(args.patch),
        "--per-slide",
        str(args.per_slide),
    ]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), float(result["cpu"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=PROJECT_ROOT / "outputs" / "bench" / "extract")
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=8192, help="slide side, level-0 px")
    parser.add_argument("--per-slide", type=int, default=250, help="patches per slide")
    parser.add_argument("--patch", type=int, default=300, help="patch side, level-0 px")
    parser.add_argument("--repeats", type=int, default=3)
    # internal: one measurement in a child process
    parser.add_argument(
        "--child", choices=["prepare", "openslide", "monai", "check"], help=argparse.SUPPRESS
    )
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--coords", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if args.child:
        child(args)
        return

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    paths = make_slides(work / "slides8", args.slides, args.size)
    two = work / "slides2"
    (two / "slides").mkdir(parents=True, exist_ok=True)
    for p in paths[:2]:
        link = two / "slides" / p.name
        if not link.exists():
            link.symlink_to(p)
    slides = {p.stem: p for p in paths}
    scratch = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    root = work / "slides8"

    # Warm the page cache; take the coordinates from this build and check the pixels agree.
    first = scratch / "first"
    measure("prepare", args, root=root, cache=first, workers=1)
    coords = coordinates(first, slides)
    coords_file = scratch / "coords.json"
    coords_file.write_text(json.dumps([(str(p), x, y) for p, x, y in coords]))
    measure("check", args, cache=first, coords=coords_file)
    n = len(coords)

    load0 = os.getloadavg()[0]
    keys = ("prepare1", "openslide", "prepare2", "monai")
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args.repeats):
        for key in keys:
            if key.startswith("prepare"):
                cache = scratch / f"{key}-{r}"
                w, c = measure("prepare", args, root=root, cache=cache, workers=int(key[-1]))
                if coordinates(cache, slides) != coords:
                    raise SystemExit("prepare drew other coordinates on a rerun with the same seed")
                shutil.rmtree(cache)
            else:
                w, c = measure(key, args, coords=coords_file)
            wall[key].append(w)
            cpu[key].append(c)
        print(
            f"repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{k} {wall[k][-1]:.2f} s ({cpu[k][-1]:.2f} CPU-s)" for k in keys),
            file=sys.stderr,
        )

    rss8, rss2 = [], []
    for r in range(args.repeats):
        rss8.append(peak_rss(root, scratch / f"rss8-{r}", args.per_slide, args.patch, 2))
        rss2.append(peak_rss(two, scratch / f"rss2-{r}", args.per_slide, args.patch, 2))
    shutil.rmtree(scratch, ignore_errors=True)
    load1 = os.getloadavg()[0]

    rate = {k: n / statistics.median(v) for k, v in wall.items()}
    per_cpu = {k: n / statistics.median(v) for k, v in cpu.items()}
    r8, r2 = statistics.median(rss8), statistics.median(rss2)
    mib = 2**20
    print(
        f"\n{n} patches of {args.patch}² px at level 0 from {args.slides} synthetic "
        f"{args.size}² slides; medians of {args.repeats} runs; {datetime.date.today()}, "
        f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load0:.1f} → {load1:.1f}\n"
    )
    print("| measurement | patches/s (wall) | patches per CPU-s | ratio (wall) | target | met |")
    print("|---|---:|---:|---:|---:|:-:|")

    def row(name: str, key: str, ratio: float | None = None, target: float | None = None) -> None:
        met = "" if target is None or ratio is None else ("yes" if ratio >= target else "no")
        ratio_s = "" if ratio is None else f"{ratio:.2f}×"
        target_s = "" if target is None else f"≥ {target}×"
        print(f"| {name} | {rate[key]:.0f} | {per_cpu[key]:.0f} | {ratio_s} | {target_s} | {met} |")

    row("bare `openslide.read_region` loop, 1 process", "openslide")
    row("MONAI `PatchWSIDataset` (OpenSlide backend), 1 process", "monai")
    row("`prepare`, 1 worker", "prepare1")
    row(
        "`prepare` 1 worker vs bare OpenSlide",
        "prepare1",
        rate["prepare1"] / rate["openslide"],
        0.9,
    )
    row("`prepare` 1 worker vs MONAI", "prepare1", rate["prepare1"] / rate["monai"], 1.5)
    row("`prepare` 2 workers vs 1 worker", "prepare2", rate["prepare2"] / rate["prepare1"], 1.6)
    ratio = r8 / r2
    print(
        f"| peak RSS (parent + workers), 8 slides vs 2 slides, 2 workers | "
        f"{r8 / mib:.0f} MiB vs {r2 / mib:.0f} MiB | | {ratio:.2f}× | ≤ 1.2× | "
        f"{'yes' if ratio <= 1.2 else 'no'} |"
    )


if __name__ == "__main__":
    main()

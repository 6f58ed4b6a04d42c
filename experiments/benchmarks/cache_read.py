"""Random-access read speed of the patch cache per codec (decode included), on one core.

Builds temporary caches (one per codec) of H&E-like patches — a smooth synthetic tissue texture
by default, or crops of a real RGB image with ``--source`` — then reads random patches through
``PatchCache[i]`` (image + mask) and prints a Markdown table: bytes per patch, random reads per
second (median of ``--repeats`` runs) with the page cache warm and, with ``--cold``, after evicting
the cache files from the page cache (``posix_fadvise(DONTNEED)``). A second table compares JPEG
decoders on the same bytes.

    python experiments/benchmarks/cache_read.py --n 2000 --patch-size 300 --repeats 5 --cold
    python experiments/benchmarks/cache_read.py --source ../shared/fixtures/real/slides/cmu_small_region.svs
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import imagecodecs
import numpy as np

from lymphnode.patches.cache import CacheWriter, PatchCache


def he_canvas(size: int, seed: int) -> np.ndarray:
    """A (size, size, 3) uint8 H&E-like texture: pink stroma, fibres, purple nuclei, fat holes."""
    rng = np.random.default_rng(seed)

    def field(sigma: float) -> np.ndarray:  # smooth noise in about [-1, 1]
        noise = cv2.GaussianBlur(
            rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma
        )
        return noise / (np.abs(noise).max() + 1e-6)

    stroma = np.array([232, 168, 200], np.float32)
    image = np.empty((size, size, 3), np.float32)
    image[:] = stroma
    image += field(40)[..., None] * np.array([10, 25, 15], np.float32)  # stain density varies
    image += field(2.5)[..., None] * np.array([12, 20, 12], np.float32)  # fibres
    fat = np.zeros((size, size), np.uint8)
    for _ in range(size * size // 200_000):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(fat, centre, int(rng.integers(20, 60)), 1, -1)
    image[fat > 0] = (245, 242, 245)
    nuclei = np.zeros((size, size), np.float32)
    for _ in range(size * size // 900):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = (int(rng.integers(3, 9)), int(rng.integers(3, 7)))
        cv2.ellipse(nuclei, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    nuclei = cv2.GaussianBlur(nuclei, (0, 0), 1.0)[..., None]
    image = image * (1 - 0.65 * nuclei) + np.array([80, 40, 130], np.float32) * 0.65 * nuclei
    image += rng.normal(0, 2.0, image.shape).astype(np.float32)  # scanner noise
    return np.clip(image, 0, 255).astype(np.uint8)


def source_image(path: Path | None, patch_size: int) -> np.ndarray:
    if path is None:
        return he_canvas(max(2048, 4 * patch_size), seed=0)
    import tifffile

    if path.suffix.lower() in (".tif", ".tiff", ".svs"):
        image = tifffile.imread(path)  # the first page = level 0
    else:
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if image.ndim != 3 or image.shape[2] < 3 or min(image.shape[:2]) < patch_size:
        raise SystemExit(f"--source {path}: need an RGB image larger than {patch_size} px")
    return np.ascontiguousarray(image[..., :3])


def patches(canvas: np.ndarray, n: int, patch_size: int, seed: int):
    """Random crops (with flips/rotations) and a blob mask per crop."""
    rng = np.random.default_rng(seed)
    h, w = canvas.shape[:2]
    for _ in range(n):
        y, x = int(rng.integers(0, h - patch_size + 1)), int(rng.integers(0, w - patch_size + 1))
        crop = np.rot90(canvas[y : y + patch_size, x : x + patch_size], int(rng.integers(4)))
        mask = np.zeros((patch_size, patch_size), np.uint8)
        if rng.random() < 0.5:
            centre = tuple(int(v) for v in rng.integers(0, patch_size, 2))
            cv2.circle(mask, centre, patch_size // 4, 1, -1)
        yield np.ascontiguousarray(crop), mask, x, y


def build(path: Path, codec: str, canvas: np.ndarray, args: argparse.Namespace) -> float:
    """Write the cache; returns patches written per second."""
    writer = CacheWriter(
        path,
        {"bench": True},
        codec=codec,
        patch_size=args.patch_size,
        has_masks=True,
        quality=args.quality,
    )
    per_slide = [args.n // args.slides + (k < args.n % args.slides) for k in range(args.slides)]
    start = time.perf_counter()
    stream = patches(canvas, args.n, args.patch_size, seed=1)
    ids = [f"slide{k:03d}" for k in range(args.slides)]
    for slide_id, n in zip(ids, per_slide):
        with writer.slide(slide_id, n=n) as shard:
            for _, (image, mask, x, y) in zip(range(n), stream):
                shard.add(image, mask, x=x, y=y, level=0, label=int(mask.any()))
        writer.commit(slide_id, shard.info)
    writer.finalize(ids)
    return args.n / (time.perf_counter() - start)


def evict(path: Path) -> None:
    """Drop the cache's files from the page cache (best effort, no root needed)."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_rate(path: Path, reads: int, seed: int, cold: bool) -> tuple[float, float]:
    """Random reads per wall-clock second and per CPU second (the latter ignores other load)."""
    if cold:
        evict(path)
    cache = PatchCache(path)
    order = np.random.default_rng(seed).integers(0, len(cache), reads).tolist()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in order:
        _image, _mask = cache[i]
    return reads / (time.perf_counter() - wall), reads / (time.process_time() - cpu)


def rate(fn: Callable[[bytes], object], blobs: list[bytes], repeats: int) -> tuple[float, float]:
    """Median decodes per wall-clock second and per CPU second."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for blob in blobs:
            fn(blob)
        walls.append(len(blobs) / (time.perf_counter() - wall))
        cpus.append(len(blobs) / (time.process_time() - cpu))
    return statistics.median(walls), statistics.median(cpus)


def decoders() -> dict[str, Callable[[bytes], object]]:
    import io

    from PIL import Image

    found: dict[str, Callable[[bytes], object]] = {
        "imagecodecs.jpeg8_decode (libjpeg-turbo)": imagecodecs.jpeg8_decode,
        "cv2.imdecode + BGR→RGB": lambda b: cv2.cvtColor(
            cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        ),
        "PIL.Image.open().convert('RGB')": lambda b: np.asarray(
            Image.open(io.BytesIO(b)).convert("RGB")
        ),
    }
    try:
        import simplejpeg

        found["simplejpeg.decode_jpeg"] = simplejpeg.decode_jpeg
    except ImportError:
        pass
    return found


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def measure(codec: str, root: Path, canvas: np.ndarray, args: argparse.Namespace) -> dict:
    """Build one cache and time random reads of it."""
    path = root / codec
    write_rate = build(path, codec, canvas, args)
    shards = sorted((path / "shards").iterdir())
    image_files = ("images.npy",) if codec == "raw" else ("images.jpegs", "offsets.npy")
    result = {
        "codec": codec if codec == "raw" else f"jpeg q{args.quality}",
        "image_bytes": sum((s / f).stat().st_size for s in shards for f in image_files) / args.n,
        "mask_bytes": sum((s / "masks.npy").stat().st_size for s in shards) / args.n,
        "write_rate": write_rate,
    }
    read_rate(path, min(200, args.reads), seed=99, cold=False)  # warm-up
    warm = [read_rate(path, args.reads, seed=k, cold=False) for k in range(args.repeats)]
    result["warm_wall"] = [w for w, _ in warm]
    result["warm_cpu"] = [c for _, c in warm]
    if args.cold:
        cold = [read_rate(path, args.reads, seed=k, cold=True) for k in range(args.repeats)]
        result["cold_wall"] = [w for w, _ in cold]
    if codec == "jpeg":
        cache = PatchCache(path)
        originals = patches(canvas, min(200, args.n), args.patch_size, seed=1)
        errors = [np.abs(cache[i][0] - o.astype(int)).mean() for i, (o, *_) in enumerate(originals)]
        result["mae"] = float(np.mean(errors))
        shard = shards[0]  # the documented layout, read directly: the stored JPEG streams
        offsets = np.load(shard / "offsets.npy")[:201].tolist()
        pack = (shard / "images.jpegs").read_bytes()
        result["blobs"] = [pack[a:b] for a, b in itertools.pairwise(offsets)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="patches per cache")
    parser.add_argument("--patch-size", type=int, default=300, help="patch side (px)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--reads", type=int, default=2000, help="random reads per run")
    parser.add_argument("--slides", type=int, default=4, help="shards the patches are split into")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--source", type=Path, help="crop patches from this RGB image / TIFF")
    parser.add_argument("--cold", action="store_true", help="also read with the page cache evicted")
    parser.add_argument("--workdir", type=Path, help="where the temporary caches go")
    parser.add_argument("--all-cores", action="store_true", help="do not pin to one core")
    args = parser.parse_args()

    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        cv2.setNumThreads(1)
    canvas = source_image(args.source, args.patch_size)
    source = args.source.name if args.source else "synthetic H&E-like texture"
    print(
        f"# patch cache random reads: {args.n} patches of {args.patch_size}² px from {source}, "
        f"image + mask per read, {args.reads} reads × {args.repeats} runs, "
        f"{'all cores' if args.all_cores else '1 core'}"
    )
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}, numpy {np.__version__}, {imagecodecs.jpeg8_version()}\n"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = [measure(codec, Path(tmp), canvas, args) for codec in ("raw", "jpeg")]
    raw_bytes = results[0]["image_bytes"]
    print(
        "| codec | image KiB/patch | smaller than raw | mask KiB/patch | random reads/s warm "
        "(median, min–max) | reads per CPU-s warm | random reads/s cold | writes/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cold = spread(r["cold_wall"]) if "cold_wall" in r else "–"
        print(
            f"| {r['codec']} | {r['image_bytes'] / 1024:,.1f} | "
            f"{raw_bytes / r['image_bytes']:.1f}× | {r['mask_bytes'] / 1024:,.1f} | "
            f"{spread(r['warm_wall'])} | {statistics.median(r['warm_cpu']):,.0f} | {cold} | "
            f"{r['write_rate']:,.0f} |"
        )
    jpeg = results[1]
    print(f"\nJPEG q{args.quality} mean absolute error vs the original: {jpeg['mae']:.2f} / 255\n")
    print(
        f"| JPEG decoder ({len(jpeg['blobs'])} stored q{args.quality} streams) | decodes/s | per CPU-s |"
    )
    print("|---|---|---|")
    for name, fn in decoders().items():
        wall, cpu = rate(fn, jpeg["blobs"], args.repeats)
        print(f"| {name} | {wall:,.0f} | {cpu:,.0f} |")
    print(f"\n# load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

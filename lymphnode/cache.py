"""``python -m lymphnode.cache import|info ...``: the patch-cache CLI.

``import`` turns patch images into a cache (:func:`lymphnode.patches.importer.import_patches`):
several inputs (folders, files, globs) and ``--list FILE``, ``--include`` / ``--exclude`` filters on
file names, masks looked up by name in ``--masks``; names ``<slide>_<x>_<y>.png`` give the slide
and the level-0 coordinates. ``info`` summarises a cache. For example, the real_dev labeled pool::

    python -m lymphnode.cache import ../shared/data/real_dev/images caches/labeled \\
        --masks ../shared/data/real_dev/masks --include 'tumor_00[14]_*'
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lymphnode.core.errors import CacheError
from lymphnode.patches.format import CODECS
from lymphnode.patches.importer import DEFAULT_MAX_PIXELS, DEFAULT_PATTERN, import_patches
from lymphnode.patches.reader import PatchCache


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m lymphnode.cache``."""
    parser = argparse.ArgumentParser(
        prog="python -m lymphnode.cache", description="Patch caches: import images, inspect."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="patch images (+ masks) -> a cache")
    imp.add_argument(
        "inputs",
        nargs="*",
        help="folders, image files or globs of PNG/JPEG/TIFF patches of one size",
    )
    imp.add_argument("out", type=Path, help="the cache directory to write")
    imp.add_argument(
        "--list", dest="list_file", type=Path, help="a file of image paths (or folders), one a line"
    )
    imp.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep only file names matching this shell pattern (repeatable)",
    )
    imp.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="drop file names matching this shell pattern (repeatable)",
    )
    imp.add_argument("--masks", type=Path, help="folder of same-named 0/255 PNG masks")
    imp.add_argument(
        "--pattern",
        default=None,
        help="regex with named groups 'slide' (and 'x', 'y': level-0 px) searched in each file "
        f"name (default: {DEFAULT_PATTERN.replace('%', '%%')}, then <slide>[_<n>] without x/y)",
    )
    imp.add_argument(
        "--no-coordinates",
        dest="coordinates",
        action="store_false",
        help="x, y = -1 (unknown): the integers in the names are not level-0 px (e.g. CAMELYON17 "
        "crops <slide>_<row>_<col>)",
    )
    imp.add_argument("--codec", choices=CODECS, default="raw")
    imp.add_argument("--quality", type=int, default=90, help="JPEG quality (codec jpeg)")
    imp.add_argument(
        "--no-label-from-mask",
        dest="label_from_mask",
        action="store_false",
        help="label -1 (unknown) instead of 1 when a mask has tumor pixels",
    )
    imp.add_argument("--force", action="store_true", help="rebuild a cache built differently")
    imp.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images of more than N px (width x height; 0: no limit; default "
        f"{DEFAULT_MAX_PIXELS}, Pillow's decompression-bomb limit)",
    )
    imp.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="µm per patch px (e.g. 0.243: CAMELYON16 level 0), recorded in the manifest so a "
        "checkpoint trained on the cache records its resolution (default: unknown)",
    )
    info = commands.add_parser("info", help="summarise a cache")
    info.add_argument("cache", type=Path)
    info.add_argument("--verify", action="store_true", help="check every file's SHA-256")
    return parser


def run(args: argparse.Namespace) -> str:
    """Do what ``args`` says; returns the one-line summary of the cache."""
    if args.command == "import":
        cache = import_patches(
            args.inputs,
            args.out,
            list_file=args.list_file,
            include=args.include,
            exclude=args.exclude,
            masks_dir=args.masks,
            slide_pattern=args.pattern,
            coordinates=args.coordinates,
            codec=args.codec,
            label_from_mask=args.label_from_mask,
            quality=args.quality,
            force=args.force,
            max_pixels=args.max_pixels,
            mpp=args.mpp,
        )
    else:
        cache = PatchCache(args.cache, verify=args.verify)
    if not cache.slides:
        raise CacheError(
            f"patch cache {cache.path} holds no complete slide (0 patches): a build or import "
            "that stopped before its first slide was committed; rerun it"
        )
    labels = cache.labels
    located = int((cache.index["x"] >= 0).sum())
    counts = [f"{slide} {n}" for slide, n in cache.slide_counts.items()]
    shown = ", ".join(counts[:6]) + (f", ... ({len(counts) - 6} more)" if len(counts) > 6 else "")
    return (
        f"{cache.path}: {len(cache)} patches from {len(cache.slides)} slides, codec "
        f"{cache.codec}, {cache.patch_size}x{cache.patch_size} px, masks "
        f"{'yes' if cache.has_masks else 'no'}, labels tumor {int((labels == 1).sum())} / "
        f"non-tumor {int((labels == 0).sum())} / unknown {int((labels == -1).sum())}, "
        f"level-0 x/y known for {located}, {_folder_bytes(cache.path) / 1e6:.1f} MB; patches per "
        f"slide: {shown}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lymphnode.cache import|info ...`` behind the error boundary of
    :mod:`lymphnode.core.boundary`; returns the exit status (1: bad input, 2: a bug)."""
    from lymphnode.core.boundary import cli_boundary

    return cli_boundary(_main)(argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = parser()
    if argv[:1] == [
        "import"
    ]:  # options may come between and after the inputs (IMAGES --masks M OUT)
        commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        args = commands.choices["import"].parse_intermixed_args(argv[1:])
        args.command = "import"
    else:
        args = top.parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

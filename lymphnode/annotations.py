"""``python -m lymphnode.annotations to-mask SLIDE XML OUT.tif [--level N] [--annotations-downsample D]``: an ASAP outline as a
pyramidal 0/255 mask TIFF (logic in :mod:`lymphnode.wsi.annotations`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lymphnode.core.errors import AnnotationError
from lymphnode.wsi.annotations import to_mask


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lymphnode.annotations to-mask SLIDE XML OUT.tif [--level N] [--annotations-downsample D]`` behind the error
    boundary of :mod:`lymphnode.core.boundary`; returns the exit code (1: bad input, 2: a bug)."""
    from lymphnode.core.boundary import cli_boundary

    return cli_boundary(_main)(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lymphnode.annotations",
        description="Tools for ASAP XML lesion annotations (CAMELYON16/17).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_mask_parser = commands.add_parser(
        "to-mask",
        help="write the tumor mask of a slide as a pyramidal 0/255 TIFF that OpenSlide opens",
        description="Rasterize tumor minus exclusion polygons on the pixel grid of one slide "
        "level and write a pyramidal 0/255 TIFF (lossless).",
    )
    to_mask_parser.add_argument("slide", type=Path, help="the slide the annotations belong to")
    to_mask_parser.add_argument("xml", type=Path, help="ASAP XML annotations")
    to_mask_parser.add_argument("out", type=Path, help="output mask TIFF")
    to_mask_parser.add_argument(
        "--level", type=int, default=0, help="slide level whose pixel grid the mask uses (0)"
    )
    to_mask_parser.add_argument(
        "--annotations-downsample",
        type=float,
        default=1.0,
        help="the XML's px per px of this slide file; coordinates are divided by it "
        "(32 for level-0 CAMELYON16 XML on a file holding the level-5 page; default 1)",
    )
    args = parser.parse_args(argv)
    try:
        out = to_mask(
            args.slide,
            args.xml,
            args.out,
            level=args.level,
            annotations_downsample=args.annotations_downsample,
            downsample_key="--annotations-downsample",
        )
    except OSError as e:  # e.g. the output folder is missing or not writable
        raise AnnotationError(f"{args.out}: cannot write the mask: {e}") from e
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

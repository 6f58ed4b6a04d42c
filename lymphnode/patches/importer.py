"""Importing patch images into a patch cache: folders, files, globs or a list of paths.

The user's own patch dataset (PNG/JPEG/TIFF squares of one size, optionally with same-named 0/255
masks) becomes a cache that training reads like one ``prepare`` wrote. File names follow the
``<slide>_<x>_<y>.<ext>`` convention by default: the slide id is everything before the last two
integer fields and x, y are the level-0 pixel coordinates of the patch's top-left corner (as
CAMELYON16 patch sets name them). A name without two trailing integers falls back to
``<slide>[_<n>].<ext>`` (slide = the name without a trailing ``_<n>`` counter) with x, y unknown
(-1), and the import says how many names fell back. Integers that are not level-0 px (e.g.
CAMELYON17 crops ``centre_0_patient_0_node_0_<row>_<col>.png``, offsets inside a tile) are kept
out with ``coordinates=False`` (the slide id is still parsed); any other convention is a regular
expression with the named groups ``slide`` and, optionally, ``x`` and ``y``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import logging
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lymphnode.core import validate
from lymphnode.core.errors import CacheError, ConfigError
from lymphnode.patches.format import CODECS, MANIFEST_NAME, SHARDS_DIR, SLIDE_ID_PATTERN
from lymphnode.patches.reader import PatchCache
from lymphnode.patches.writer import CacheWriter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: ``<slide>_<x>_<y>.<ext>``: slide = everything before the last two integer fields.
DEFAULT_PATTERN = r"^(?P<slide>.+)_(?P<x>\d+)_(?P<y>\d+)\.[^.]+$"
#: Names without coordinates: ``<slide>[_<n>].<ext>``, x and y unknown.
FALLBACK_PATTERN = r"^(?P<slide>.+?)(?:_\d+)?\.[^.]+$"
_GLOB_CHARS = re.compile(r"[*?[]")
#: Largest image (width x height, px) imported by default: Pillow's own decompression-bomb limit
#: (about 9459² px); patches are far smaller. ``max_pixels`` / ``--max-pixels`` raise it.
DEFAULT_MAX_PIXELS = 89_478_485

__all__ = [
    "DEFAULT_PATTERN",
    "IMAGE_SUFFIXES",
    "collect_images",
    "import_patch_folder",
    "import_patches",
    "parse_name",
]


@contextlib.contextmanager
def _open_image(path: Path, max_pixels: int | None) -> Iterator[Any]:
    """``PIL.Image.open(path)`` with our size check in place of Pillow's decompression-bomb
    error: CacheError naming the file, its size and the option that raises the limit, before
    any pixel is decoded. ``max_pixels``: None or 0 = no limit."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # checked here instead, with a message that names the option
    try:
        with Image.open(path) as im:
            width, height = im.size
            if max_pixels and width * height > max_pixels:
                raise CacheError(
                    f"image {path} is {width}x{height} px ({width * height:,} px), more than "
                    f"max_pixels={max_pixels:,} (the guard against decompression bombs; patches "
                    f"are small squares). If the file is meant, raise the limit: cache import "
                    f"--max-pixels {width * height} (import_patches(max_pixels=...); 0: no limit)"
                )
            yield im
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _read_rgb(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; alpha is composited on white."""
    from PIL import Image

    try:
        with _open_image(path, max_pixels) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise CacheError(f"{path}: {im.mode} images are not supported (expected 8-bit)")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(white, im.convert("RGBA")).convert("RGB"))
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise CacheError(f"cannot read image {path}: {exc}") from exc


def _read_mask(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A 0/255 (or 0/1) mask file as (H, W) uint8 {0, 1}."""
    try:
        with _open_image(path, max_pixels) as im:
            array = np.asarray(im.convert("RGB") if im.mode not in ("1", "L") else im)
    except OSError as exc:
        raise CacheError(f"cannot read mask {path}: {exc}") from exc
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise CacheError(f"mask {path} is a colour image; expected a grey 0/255 mask")
        array = array[..., 0]
    values = np.unique(array)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        raise CacheError(
            f"mask {path} has values {values[:8].tolist()}; expected 0/255 (or 0/1) only"
        )
    return (array > 0).astype(np.uint8)


def _image_size(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) px of an image file, read from its header."""
    try:
        with _open_image(path, max_pixels) as im:
            return im.size  # (width, height)
    except OSError as exc:
        raise CacheError(f"cannot read image {path}: {exc}") from exc


def _expand(entry: str | Path, origin: str) -> list[Path]:
    """The image files one input names: a folder's images, a file, or a glob's matches."""
    text = str(entry)
    path = Path(text).expanduser()
    if not path.exists() and _GLOB_CHARS.search(text):
        matches = sorted(Path(p) for p in glob.glob(str(path)))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise CacheError(
                f"{origin}glob {text!r} matches no PNG/JPEG/TIFF file ({len(matches)} entries)"
            )
        return files
    if path.is_dir():
        entries = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        files = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CacheError(
                f"{origin}no PNG/JPEG/TIFF images ({', '.join(IMAGE_SUFFIXES)}) in {path}"
            )
        if len(entries) > len(files):
            log.warning(
                "ignoring %d files in %s that are not PNG/JPEG/TIFF",
                len(entries) - len(files),
                path,
            )
        return files
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise CacheError(
                f"{origin}{path} is not a PNG/JPEG/TIFF image (expected one of "
                f"{', '.join(IMAGE_SUFFIXES)})"
            )
        return [path]
    raise CacheError(
        f"{origin}images input not found: {path} (expected a folder, an image file or a glob)"
    )


def _read_list(list_file: Path) -> list[str]:
    """The paths in ``list_file``: one a line, ``#`` comments and blank lines skipped; relative
    paths are relative to the list file's folder."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheError(f"cannot read the list of images {list_file}: {exc}") from exc
    entries = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        entries.append(str(path if path.is_absolute() else list_file.parent / path))
    if not entries:
        raise CacheError(f"the list of images {list_file} names no path")
    return entries


def collect_images(
    inputs: Iterable[str | Path] = (),
    *,
    list_file: str | Path | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[Path]:
    """The image files that ``inputs`` (folders, files, globs) and ``list_file`` name, sorted by
    file name; a file named twice counts once.

    ``include`` / ``exclude`` are shell patterns on the file name (``tumor_00[14]_*``): a file is
    kept when it matches an include pattern (all files when there is none) and no exclude pattern.

    Raises:
        CacheError: an input that does not exist, is not an image or holds none; a filter that
            leaves no file; two different files with one name (masks are looked up by name).
    """
    sources = [(entry, "") for entry in inputs]
    if list_file is not None:
        list_path = Path(list_file)
        sources += [(e, f"{list_path}: ") for e in _read_list(list_path)]
    if not sources:
        raise CacheError("no images input: give folders, files or globs, or a list file")
    by_name: dict[str, Path] = {}
    for entry, origin in sources:
        for path in _expand(entry, origin):
            kept = by_name.setdefault(path.name, path)
            if kept != path and kept.resolve() != path.resolve():
                raise CacheError(
                    f"two images are named {path.name!r}: {kept} and {path}; names must be "
                    "unique (they order the patches and find the masks)"
                )
    names = [
        n
        for n in by_name
        if (not include or any(fnmatch.fnmatchcase(n, p) for p in include))
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    if not names:
        raise CacheError(
            f"no image is left after the filters (include {list(include)}, exclude "
            f"{list(exclude)}) out of {len(by_name)} files"
        )
    return [by_name[n] for n in sorted(names)]


def _compile(slide_pattern: str | None) -> re.Pattern[str] | None:
    """The user's pattern, checked; None for the default convention."""
    if slide_pattern is None:
        return None
    try:
        pattern = re.compile(slide_pattern)
    except re.error as exc:
        raise ConfigError(
            f"slide_pattern {slide_pattern!r} is not a valid regular expression: {exc}"
        ) from exc
    groups = set(pattern.groupindex)
    if "slide" not in groups:
        raise ConfigError(
            f"slide_pattern {slide_pattern!r} has no named group 'slide'; write it as e.g. "
            r"'^(?P<slide>[^_]+)' (and (?P<x>\d+), (?P<y>\d+) for level-0 px coordinates)"
        )
    if ("x" in groups) != ("y" in groups):
        raise ConfigError(
            f"slide_pattern {slide_pattern!r} has only one of the groups 'x' and 'y'; give both "
            "or neither"
        )
    return pattern


MAX_COORDINATE = 2**63 - 1  # level-0 px: the index stores x and y as int64
_DEFAULT = re.compile(DEFAULT_PATTERN)
_FALLBACK = re.compile(FALLBACK_PATTERN)


def parse_name(
    name: str, pattern: re.Pattern[str] | None = None, *, coordinates: bool = True
) -> tuple[str, int, int, bool]:
    """``(slide, x, y, fell_back)`` of an image file name.

    Without ``pattern`` the default convention ``<slide>_<x>_<y>.<ext>`` (x, y level-0 px), or
    the fallback ``<slide>[_<n>].<ext>`` with x = y = -1 (``fell_back`` True). With ``pattern``,
    its named groups (searched in the name); x = y = -1 when it has no x/y groups. With
    ``coordinates=False`` x = y = -1 always.

    Raises:
        CacheError: no match, an empty or unusable slide id, x/y that are not integers.
    """
    fell_back = False
    if pattern is None:
        match = _DEFAULT.match(name)
        if match is None:
            match, fell_back = _FALLBACK.match(name), True
        shown = "the default <slide>_<x>_<y> (or <slide>[_<n>])"
    else:
        match = pattern.search(name)
        shown = f"slide_pattern {pattern.pattern!r}"
    if match is None or not match.group("slide"):
        raise CacheError(f"file name {name!r} does not match {shown}: no slide id")
    slide = match.group("slide")
    if not SLIDE_ID_PATTERN.match(slide):
        raise CacheError(
            f"file name {name!r}: slide id {slide!r} from {shown} is not usable: expected "
            "letters, digits and '._+-', starting with a letter or digit"
        )
    x = y = -1
    if coordinates and "x" in match.re.groupindex and match.group("x") is not None:
        try:
            x, y = int(match.group("x")), int(match.group("y"))
        except (TypeError, ValueError):
            raise CacheError(
                f"file name {name!r}: x={match.group('x')!r}, y={match.group('y')!r} from {shown} "
                "are not integers (level-0 px)"
            ) from None
        if x < 0 or y < 0:
            raise CacheError(f"file name {name!r}: x={x}, y={y} must be >= 0 (level-0 px)")
        if max(x, y) > MAX_COORDINATE:
            raise CacheError(
                f"file name {name!r}: x={x}, y={y} from {shown}: expected level-0 px <= "
                f"{MAX_COORDINATE:,} (the cache stores 64-bit coordinates)"
            )
    return slide, x, y, fell_back


def _find_mask(masks_dir: Path, image: Path) -> Path:
    candidates = [masks_dir / image.name, masks_dir / f"{image.stem}.png"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CacheError(f"no mask for {image}: looked for {candidates[0]} and .png")
    return found


def import_patches(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    list_file: str | Path | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    masks_dir: str | Path | None = None,
    slide_pattern: str | None = None,
    coordinates: bool = True,
    codec: str = "raw",
    label_from_mask: bool = True,
    quality: int = 90,
    force: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    mpp: float | None = None,
) -> PatchCache:
    """Turn patch images (PNG/JPEG/TIFF squares of one size) into a patch cache.

    ``inputs`` are folders (their images, not recursive), image files and globs; ``list_file``
    adds one path a line (see :func:`collect_images` for the ``include`` / ``exclude`` filters).
    Files are taken in sorted name order, grouped by slide in order of first appearance; each
    name gives slide, x and y (level-0 px) by :func:`parse_name`. With ``masks_dir``, every image
    needs a mask of the same name (or the same stem with ``.png``) holding 0/255 (or 0/1); the
    label is 1 when the mask has a tumor pixel (``label_from_mask``), else 0; without masks or
    ``label_from_mask`` the label is -1 (unknown); level is 0. Rerunning resumes an interrupted
    import; the config records the inputs, filters, file list digest and pattern. An image (or
    mask) of more than ``max_pixels`` px (width x height; None or 0: no limit) is refused before
    it is decoded. ``mpp`` is the µm per patch px (e.g. 0.243 for CAMELYON16 level 0): recorded in
    the manifest's config as prepare's caches record theirs, so a network trained on the cache
    records the resolution it was trained at (None: unknown, not recorded).

    Returns:
        the finished cache, opened.

    Raises:
        ConfigError: bad pattern (invalid, no ``slide`` group, only one of ``x``/``y``), codec or
            quality.
        CacheError: missing input, no images, a name the pattern does not match, a file of
            another size, a missing or non-binary mask, an existing cache built differently.
    """
    entries = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    masks_path = Path(masks_dir) if masks_dir is not None else None
    if masks_path is not None and not masks_path.is_dir():
        raise CacheError(f"masks folder not found: {masks_path}")
    pattern = _compile(slide_pattern)
    validate.choice("cache codec", codec, CODECS)
    if max_pixels is not None:
        validate.integer("max_pixels", max_pixels, 0, unit="px (0: no limit)")
    if codec == "jpeg":
        validate.integer("JPEG quality", quality, 1, 100)
    if mpp is not None:
        mpp = validate.number("--mpp", mpp, 0, strict_minimum=True, unit="µm/px")
    files = collect_images(entries, list_file=list_file, include=include, exclude=exclude)

    by_slide: dict[str, list[tuple[Path, Path | None, int, int]]] = {}
    first_size: tuple[int, int] | None = None
    fallbacks = 0
    for path in files:
        slide_id, x, y, fell_back = parse_name(path.name, pattern, coordinates=coordinates)
        fallbacks += fell_back
        size = _image_size(path, max_pixels)
        if first_size is None:
            first_size = size
            if size[0] != size[1]:
                raise CacheError(f"{path}: patches must be square, this one is {size[0]}x{size[1]}")
        elif size != first_size:
            raise CacheError(
                f"{path} is {size[0]}x{size[1]} px but {files[0].name} is "
                f"{first_size[0]}x{first_size[1]}; all patches must have the same size"
            )
        mask_file = None
        if masks_path is not None:
            mask_file = _find_mask(masks_path, path)
            mask_size = _image_size(mask_file, max_pixels)
            if mask_size != size:
                raise CacheError(
                    f"mask {mask_file} is {mask_size[0]}x{mask_size[1]} px but its image {path} is "
                    f"{size[0]}x{size[1]}"
                )
        by_slide.setdefault(slide_id, []).append((path, mask_file, x, y))
    if fallbacks:
        log.warning(
            "%d of %d file names do not end in _<x>_<y> (e.g. %s): slide id = the name without a "
            "trailing _<n>, x and y unknown (-1); pass slide_pattern to parse them otherwise",
            fallbacks,
            len(files),
            next(p.name for p in files if parse_name(p.name, pattern)[3]),
        )

    if first_size is None:  # pragma: no cover - collect_images returns at least one file
        raise CacheError("no images to import")
    names = "\n".join(p.name for p in files)
    config = {
        "source": "import_patches",
        "inputs": [str(Path(e).expanduser().resolve()) for e in entries],
        "list_file": str(Path(list_file).resolve()) if list_file is not None else None,
        "include": list(include),
        "exclude": list(exclude),
        "files": len(files),
        "files_sha256": hashlib.sha256(names.encode("utf-8")).hexdigest(),
        "masks_dir": str(masks_path.resolve()) if masks_path is not None else None,
        "slide_pattern": slide_pattern,
        "coordinates": bool(coordinates),
        "label_from_mask": bool(label_from_mask),
    }
    if mpp is not None:  # recorded when given only, so caches imported before it still resume
        config["mpp"] = float(mpp)
    out = Path(out)
    created = not out.exists()
    fresh = created or not (out / MANIFEST_NAME).exists()
    writer = CacheWriter(
        out,
        config,
        codec=codec,
        patch_size=first_size[0],
        has_masks=masks_path is not None,
        quality=quality,
        force=force,
    )
    try:
        for slide_id, items in by_slide.items():
            if writer.is_complete(slide_id):
                continue
            with writer.slide(slide_id, n=len(items)) as shard:
                for image_path, mask_path, x, y in items:
                    mask = _read_mask(mask_path, max_pixels) if mask_path is not None else None
                    label = int(mask.any()) if mask is not None and label_from_mask else -1
                    image = _read_rgb(image_path, max_pixels)
                    shard.add(image, mask, x=x, y=y, level=0, label=label)
            writer.commit(slide_id, shard.info)
    except BaseException:
        if fresh and not writer.manifest_slides():
            _remove_new_cache(out, created)  # nothing half-written: no 0-slide cache left behind
        raise
    writer.finalize(list(by_slide))
    return PatchCache(out)


def _remove_new_cache(out: Path, created: bool) -> None:
    """Remove the empty cache an import that failed before its first slide had started: the
    folder when the import made it, else only the manifest and shards/ it wrote."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)


#: The name of earlier releases (one folder as ``inputs``).
import_patch_folder = import_patches

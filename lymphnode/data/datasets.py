"""A torch ``Dataset`` over a patch cache (:class:`lymphnode.patches.cache.PatchCache`).

Each process that reads (the main process, every DataLoader worker) opens the cache itself on its
first read: the dataset pickles without open files, and a forked worker does not reuse its parent's
memory maps. In a worker the augmentation pipeline is also reseeded from the worker's torch seed
(``DataLoader(generator=...)`` base seed + worker id), so workers never repeat each other's
augmentations and a seeded DataLoader gives the same batches on every run. Keys from
:class:`lymphnode.data.samplers.EpochSampler` (training) reseed it per item instead, from the
epoch and the position: the same augmentation whatever the workers, and after a resume.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
from torch.utils.data import Dataset, get_worker_info

from lymphnode.core import validate
from lymphnode.core.errors import CacheError, ConfigError
from lymphnode.data.samplers import item_seed
from lymphnode.data.transforms import seed_pipeline, to_sample
from lymphnode.patches.cache import PatchCache


class CacheDataset(Dataset):
    """Patches ``indices`` of the cache at ``cache_path``, as dicts of tensors.

    Items: ``{"image": (3, P, P) float32, "mask": (1, P, P) float32 {0, 1} (only with
    with_masks), "index": int (the patch's position in the cache)}``, plus ``"image2"``,
    ``"image3"``, ... with ``views > 1`` (further independent draws of ``transform`` from the same
    patch: the views of a joint-embedding pretext); P = the cache's patch size
    in pixels of the level it was read at. With ``transform=None`` the image is ``uint8 / 255`` in
    0..1 (no normalisation).

    Args:
        cache_path: the patch-cache directory.
        indices: cache positions to serve, in this order (None: all patches).
        transform: an albumentations pipeline (``lymphnode.data.transforms.build_*_transform``).
        with_masks: return masks (the cache must have them).
        views: images per item (1, or 2+ for independent augmented views; not with masks).

    Raises:
        CacheError: missing or unreadable cache (from PatchCache), or with_masks on a cache
            without masks.
        ConfigError: an index out of range.
    """

    def __init__(
        self,
        cache_path: str | Path,
        indices: Sequence[int] | np.ndarray | None = None,
        transform: A.Compose | None = None,
        with_masks: bool = False,
        views: int = 1,
    ) -> None:
        self.cache_path = Path(cache_path)
        self.views = validate.integer("views", views, 1)
        if self.views > 1 and with_masks:
            raise ConfigError(f"views={views} with masks is not supported: views are images only")
        cache = PatchCache(self.cache_path)  # validates the manifest; opens no shard file yet
        n = len(cache)
        if with_masks and not cache.has_masks:
            raise CacheError(
                f"patch cache {self.cache_path} has no masks, but with_masks=True: build it from "
                "annotated slides (a labeled/test cache)"
            )
        if indices is None:
            self.indices = np.arange(n, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            bad = self.indices[(self.indices < 0) | (self.indices >= n)]
            if len(bad):
                raise ConfigError(
                    f"indices include {bad[:5].tolist()}: patch cache {self.cache_path} has {n} "
                    f"patches (valid 0..{n - 1})"
                )
        self.transform = transform
        self.with_masks = bool(with_masks)
        self._cache: PatchCache | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # never pickle an open cache; the receiving process opens its own
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"CacheDataset({str(self.cache_path)!r}, n={len(self)}, with_masks={self.with_masks})"
        )

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> PatchCache:
        pid = os.getpid()
        if self._cache is None or self._pid != pid:
            self._cache = PatchCache(self.cache_path)
            self._pid = pid
            worker = get_worker_info()
            if worker is not None and isinstance(self.transform, A.Compose):
                seed_pipeline(self.transform, worker.seed % 2**32)
        return self._cache

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key``: a position, or ``(epoch seed, position)`` from
        :class:`lymphnode.data.samplers.EpochSampler`, which seeds the augmentation of this one
        item (the same patch in the same epoch is augmented the same way in any process)."""
        if isinstance(key, tuple):
            seed_key, i = key
            if isinstance(self.transform, A.Compose):
                seed_pipeline(self.transform, item_seed((int(seed_key), int(i))))
        else:
            i = key
        index = int(self.indices[i])
        image, mask = self._open()[index]
        tensor, mask_tensor = to_sample(self.transform, image, mask if self.with_masks else None)
        item: dict[str, Any] = {"image": tensor}
        for view in range(2, self.views + 1):
            item[f"image{view}"] = to_sample(self.transform, image, None)[0]
        if self.with_masks:
            item["mask"] = mask_tensor
        item["index"] = index
        return item


__all__ = ["CacheDataset"]

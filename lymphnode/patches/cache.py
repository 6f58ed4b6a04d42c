"""The patch cache's public names in one import (other packages and user code import these).

The cache is split by job: the layout and manifest in :mod:`lymphnode.patches.format`, writing in
:mod:`lymphnode.patches.writer`, reading in :mod:`lymphnode.patches.reader`, importing image
folders in :mod:`lymphnode.patches.importer`; the ``python -m lymphnode.cache`` CLI is
:mod:`lymphnode.cache`.
"""

from __future__ import annotations

from lymphnode.patches.format import CACHE_FORMAT_VERSION, CODECS
from lymphnode.patches.importer import import_patch_folder, import_patches
from lymphnode.patches.reader import PatchCache
from lymphnode.patches.writer import CacheWriter, ShardWriter

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CODECS",
    "CacheWriter",
    "PatchCache",
    "ShardWriter",
    "import_patch_folder",
    "import_patches",
]

"""LightningDataModules over patch caches: reconstruction pretraining and few-label fine-tuning.

- :class:`PretrainDataModule`: the unlabeled cache, split into train/validation by a seeded
  permutation of its patches (``val_fraction``).
- :class:`FinetuneDataModule`: a deterministic, class-stratified subset of ``labeled_size``
  patches of the labeled cache, split into ``folds`` class-stratified folds (or, with
  ``fold_by=slide``, folds of whole slides); trains on all folds but ``fold``, validates on
  ``fold``, tests on the whole test cache (held-out slides).

Both build the preprocessing contract (:attr:`preprocess`, a :class:`lymphnode.models.Preprocess`)
from the training cache's manifest and the data config; the task modules save it in their
checkpoints.

The fine-tuning subset depends only on (the labeled cache's labels, ``labeled_size``,
``subset_seed``, which defaults to ``seed``):
never on ``fold``, the init (pretrained or scratch) or anything else, so the pretrained-vs-scratch
comparison is paired. Subsets are nested: for one seed, the 40-patch subset is contained in the
80-patch subset, and so on (see :func:`stratified_subset`).

Batches: ``{"image": (B, 3, P, P) float32 normalised, "mask": (B, 1, P, P) float32 {0, 1}
(labeled caches), "index": (B,) int64 cache positions}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lymphnode.core import validate
from lymphnode.core.errors import CacheError, ConfigError
from lymphnode.data.datasets import CacheDataset
from lymphnode.data.samplers import EpochSampler
from lymphnode.data.stain_transfer import fit_lab_distribution
from lymphnode.data.transforms import build_eval_transform, build_train_transform
from lymphnode.models.preprocess import Preprocess, normalize_stats
from lymphnode.models.stain import (
    MacenkoNormalizer,
    ReinhardNormalizer,
    build_stain_normalizer,
    load_reference_image,
)
from lymphnode.patches.cache import PatchCache

log = logging.getLogger(__name__)

CLASSES = (0, 1)  # 0 non-tumor, 1 tumor (the cache's label convention)
CLASS_NAMES = {0: "non-tumor", 1: "tumor"}
_TRANSFORM_KEYS = ("d4", "color_jitter", "hed", "crop", "blur", "grayscale", "randstain")
_RANDSTAIN_KEYS = ("cache", "n_patches", "seed", "spread", "p")
_RANDSTAIN_DEFAULTS: dict[str, Any] = {
    "cache": None,  # the cache whose stains are sampled (the unlabeled pool); required
    "n_patches": 256,  # patches of it the distribution is fitted to
    "seed": 0,  # its own seed: the distribution must not change with the run seed
    "spread": 1.0,  # multiple of the pool's standard deviations
    "p": 0.8,  # probability per image
}
FOLD_BY = ("patch", "slide")
_STAIN_KEYS = ("method", "reference", "reference_cache", "n_patches", "seed", "options")
_STAIN_DEFAULTS: dict[str, Any] = {
    "reference": None,  # an RGB image file; None: n_patches of the training cache
    "reference_cache": None,  # another cache to draw the reference patches from
    "n_patches": 32,
    "seed": 0,  # its own seed: the reference must not change with the run seed
    "options": {},  # keyword arguments of the normaliser class
}


# ----------------------------------------------------------------------------- split functions
def _allocate(size: int, counts: Sequence[int], minimum: int = 0) -> list[int]:
    """Split ``size`` among classes proportionally to ``counts`` (largest remainder, ties to the
    lower class). With two classes this is ``round_half_up(size * p)`` for class 0, monotone in
    ``size`` for both classes, which makes subsets nested.

    ``minimum``: a class whose share falls below ``min(minimum, its count)`` is raised to it, the
    patches taken from the largest class (so that every validation fold can hold every class when
    one class is rare: with 24 tumour and 7 normal patches, 10 labels give 5 + 5, not 8 + 2). With
    two classes the raised allocation stays monotone in ``size``, so subsets stay nested.
    """
    total = sum(counts)
    quotas = [size * c / total for c in counts]
    alloc = [int(np.floor(q)) for q in quotas]
    order = sorted(range(len(counts)), key=lambda k: (-(quotas[k] - alloc[k]), k))
    for k in order[: size - sum(alloc)]:
        alloc[k] += 1
    for k, count in enumerate(counts):
        need = min(minimum, count) - alloc[k]
        while need > 0:
            donors = [
                j for j in range(len(counts)) if j != k and alloc[j] > min(minimum, counts[j])
            ]
            if not donors:
                break
            donor = max(donors, key=lambda j: (alloc[j], -j))
            alloc[donor] -= 1
            alloc[k] += 1
            need -= 1
    return alloc


def stratified_subset(
    labels: np.ndarray, size: int, seed: int, minimum: int = 0
) -> list[np.ndarray]:
    """A class-stratified random subset of ``size`` patch positions, per class.

    Each class's positions are permuted with a generator seeded by ``(seed, class)`` and the first
    ``k_c`` are taken, ``k_c`` proportional to the class's share of ``labels`` (largest remainder).
    The permutation does not depend on ``size``, so for one seed a smaller subset is contained in a
    larger one (binary labels).

    Args:
        labels: (N,) class of every patch of the cache (0 or 1).
        size: patches to select, 1..N.
        seed: non-negative integer.
        minimum: each class gets at least ``min(minimum, its count)`` patches when ``size``
            allows (the fine-tuning DataModule passes ``folds``).

    Returns:
        one int64 array per class of :data:`CLASSES`, in that class's permuted order.
    """
    positions = [np.flatnonzero(labels == c) for c in CLASSES]
    alloc = _allocate(size, [len(p) for p in positions], minimum)
    return [
        np.random.default_rng([seed, c]).permutation(p)[:k]
        for c, p, k in zip(CLASSES, positions, alloc)
    ]


def stratified_folds(per_class: Sequence[np.ndarray], folds: int) -> list[np.ndarray]:
    """Deal a per-class subset into ``folds`` folds: class by class, position ``j`` of the
    concatenation goes to fold ``j % folds``. Folds get equal sizes (±1) and each class's count per
    fold differs by at most 1 between folds. Each fold is returned sorted."""
    ordered = np.concatenate(per_class) if per_class else np.empty(0, np.int64)
    return [np.sort(ordered[k::folds]) for k in range(folds)]


def slide_folds(
    per_class: Sequence[np.ndarray], slides: np.ndarray, folds: int, seed: int
) -> list[np.ndarray]:
    """Deal a subset into ``folds`` folds of whole slides: no slide has patches in two folds.

    The subset's slides are shuffled (seeded by ``seed``), then taken largest first (stable) and
    each is given to the fold with the fewest patches so far (ties: the lower fold), so folds get
    about equal numbers of patches.

    Args:
        per_class: the subset, one array of cache positions per class (:func:`stratified_subset`).
        slides: (N,) slide id of every patch of the cache.
        folds: number of folds.
        seed: seed of the shuffle that breaks ties between equally large slides.

    Raises:
        ConfigError: the subset's patches come from fewer than ``folds`` slides.
    """
    subset = np.sort(np.concatenate(per_class)) if per_class else np.empty(0, np.int64)
    names, inverse = np.unique(slides[subset], return_inverse=True)
    if len(names) < folds:
        raise ConfigError(
            f"fold_by=slide needs at least folds={folds} slides, but the labeled subset's "
            f"{len(subset)} patches come from {len(names)} slide(s) {names.tolist()}: expected "
            "fewer folds, a larger labeled_size, or fold_by=patch"
        )
    counts = np.bincount(inverse, minlength=len(names))
    order = np.random.default_rng([seed, folds]).permutation(len(names))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(folds, np.int64)
    fold_of = np.empty(len(names), np.int64)
    for k in order:
        target = int(np.argmin(sizes))
        fold_of[k] = target
        sizes[target] += counts[k]
    return [np.sort(subset[fold_of[inverse] == f]) for f in range(folds)]


def _warn_single_class_folds(folds: Sequence[np.ndarray], labels: np.ndarray, path: Path) -> None:
    for k, fold in enumerate(folds):
        present = sorted({int(v) for v in labels[fold]})
        if present != list(CLASSES):
            log.warning(
                "fold_by=slide: fold %d of %s holds only %s patches (%d): its validation "
                "precision/recall are then undefined or trivial",
                k,
                path,
                "/".join(CLASS_NAMES[c] for c in present),
                len(fold),
            )


# ---------------------------------------------------------------------------------- helpers
def _cache_level(cache: PatchCache) -> int:
    levels = np.unique(cache.index["level"])
    if len(levels) != 1:
        raise CacheError(
            f"patch cache {cache.path} mixes slide levels {levels.tolist()}: expected one level "
            "(rebuild it with a single data.level / mpp)"
        )
    return int(levels[0])


def _cache_mpp(cache: PatchCache) -> float | None:
    """Microns per level-0 px the cache was built for, when its config recorded a number."""
    mpp = cache.config.get("mpp")
    if isinstance(mpp, int | float) and not isinstance(mpp, bool) and mpp > 0:
        return float(mpp)
    return None


def _class_labels(cache: PatchCache) -> np.ndarray:
    """(N,) 0/1 class per patch: the index label, or for unknown (-1) labels, whether the mask has
    any tumor pixel."""
    labels = cache.labels.copy()
    unknown = np.flatnonzero(labels < 0)
    if len(unknown):
        if not cache.has_masks:
            raise CacheError(
                f"patch cache {cache.path} has {len(unknown)} patches with unknown label (-1) "
                "and no masks to derive it from: expected labels 0/1"
            )
        log.info("deriving %d unknown labels of %s from their masks", len(unknown), cache.path)
        for i in unknown:
            mask = cache[int(i)][1]
            labels[i] = int(mask is not None and bool(mask.any()))
    return labels


def _transform_options(transforms: Mapping[str, Any] | None) -> dict[str, Any]:
    if transforms is None:
        return {}
    transforms = validate.keys("transforms", transforms, _TRANSFORM_KEYS)
    return {k: _plain(v) for k, v in transforms.items()}


def _randstain_options(randstain: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``transforms.randstain`` with its defaults, checked (the distribution is fitted later)."""
    if randstain is None or randstain is False:
        return None
    if not isinstance(randstain, Mapping) or not randstain.get("cache"):
        raise ConfigError(
            f"transforms.randstain={randstain!r} is invalid: expected null or a mapping with "
            f"'cache' (the unlabeled cache whose stains are sampled) and optional "
            f"{list(_RANDSTAIN_KEYS[1:])}"
        )
    validate.keys("transforms.randstain", randstain, _RANDSTAIN_KEYS)
    options = {**_RANDSTAIN_DEFAULTS, **_plain(randstain)}
    validate.integer("transforms.randstain.n_patches", options["n_patches"], 2)
    validate.integer("transforms.randstain.seed", options["seed"], 0)
    spread, p = options["spread"], options["p"]
    if not (isinstance(spread, (int, float)) and 0.0 <= spread < 100.0):
        raise ConfigError(f"transforms.randstain.spread={spread!r} is invalid: expected >= 0")
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ConfigError(f"transforms.randstain.p={p!r} is invalid: expected in [0, 1]")
    return options


def _plain(value: Any) -> Any:
    """OmegaConf containers -> dict/list (albumentations and our checks want plain types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _stain_options(stain_norm: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if stain_norm is None:
        return None
    if not isinstance(stain_norm, Mapping) or "method" not in stain_norm:
        raise ConfigError(
            f"stain_norm={stain_norm!r} is invalid: expected null or a mapping with 'method' "
            f"(macenko | reinhard) and optional {list(_STAIN_KEYS[1:])}"
        )
    validate.keys("stain_norm", stain_norm, _STAIN_KEYS)
    options = {**_STAIN_DEFAULTS, **_plain(stain_norm)}
    validate.integer("stain_norm.n_patches", options["n_patches"], 1)
    validate.integer("stain_norm.seed", options["seed"], 0)
    build_stain_normalizer(options["method"], **(options["options"] or {}))  # validates early
    return options


# ------------------------------------------------------------------------------------ base
class _CacheDataModule(pl.LightningDataModule):
    """Shared DataLoader, transform and stain-normalisation logic."""

    def __init__(
        self,
        *,
        train_cache: str | Path,
        seed: int,
        batch_size: int,
        num_workers: int,
        pin_memory: bool | None,
        persistent_workers: bool,
        drop_last: bool,
        transforms: Mapping[str, Any] | None,
        normalize: Mapping[str, Sequence[float]] | None,
        stain_norm: Mapping[str, Any] | None,
    ) -> None:
        super().__init__()
        self.train_cache = Path(train_cache)
        self.seed = validate.integer("seed", seed, 0)
        self.batch_size = validate.integer("batch_size", batch_size, 1)
        self.num_workers = validate.integer("num_workers", num_workers, 0)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.transform_options = _transform_options(transforms)
        self.randstain_options = _randstain_options(self.transform_options.pop("randstain", None))
        self._randstain: dict[str, Any] | None = None
        self._normalize = normalize_stats(_plain(normalize))
        self.stain_options = _stain_options(stain_norm)
        build_train_transform(Preprocess(0, 1), **self.transform_options)  # validates them now
        self._stain: MacenkoNormalizer | ReinhardNormalizer | None = None
        self._meta: tuple[int, int] | None = None
        self._mpp: float | None = None
        self._preprocess: Preprocess | None = None
        self.train_dataset: CacheDataset | None = None
        self.val_dataset: CacheDataset | None = None
        self.test_dataset: CacheDataset | None = None

    # -- the preprocessing contract (what the task module saves in its checkpoints) ----------
    @property
    def normalize(self) -> dict[str, list[float]]:
        """``{"mean": [r, g, b], "std": [r, g, b]}`` in 0..1 units: ``(img / 255 - mean) / std``."""
        return {k: list(v) for k, v in self._normalize.items()}

    def _metadata(self) -> tuple[int, int]:
        if self._meta is None:
            cache = PatchCache(self.train_cache)
            self._meta = (cache.patch_size, _cache_level(cache))
            crop = self.transform_options.get("crop")
            if crop is not None and crop > cache.patch_size:
                raise ConfigError(
                    f"transforms.crop={crop} is larger than the patches of {self.train_cache} "
                    f"({cache.patch_size} px): expected at most {cache.patch_size}"
                )
            self._mpp = _cache_mpp(cache)
        return self._meta

    @property
    def cache_patch_size(self) -> int:
        """Side in px of the training cache's patches (its manifest)."""
        return self._metadata()[0]

    @property
    def patch_size(self) -> int:
        """Side in px of :attr:`level` of what the network trains on: ``transforms.crop`` when
        set, else the cache's patch size."""
        return self.transform_options.get("crop") or self.cache_patch_size

    @property
    def level(self) -> int:
        """The slide level the training cache's patches were read at."""
        return self._metadata()[1]

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing contract of this data (fits the stain normaliser on first use).

        The hook of the task modules: :meth:`lymphnode.tasks.base.TaskModule.setup` takes it from
        ``trainer.datamodule`` and saves it in every checkpoint, and ``infer`` applies it.
        """
        if self._preprocess is None:
            normalizer = self.stain_normalizer
            self._preprocess = Preprocess(
                level=self.level,
                patch_size=self.patch_size,
                mean=tuple(self._normalize["mean"]),
                std=tuple(self._normalize["std"]),
                stain=None if normalizer is None else normalizer.state(),
                mpp=self._mpp,
            )
        return self._preprocess

    # -- transforms ----------------------------------------------------------------------------
    @property
    def stain_normalizer(self) -> MacenkoNormalizer | ReinhardNormalizer | None:
        """The fitted stain normaliser (fitted on first use), or None when stain_norm is null."""
        if self.stain_options is None:
            return None
        if self._stain is None:
            self._stain = self._fit_stain(self.stain_options)
        return self._stain

    def _fit_stain(self, options: Mapping[str, Any]) -> MacenkoNormalizer | ReinhardNormalizer:
        normalizer = build_stain_normalizer(options["method"], **(options["options"] or {}))
        if options["reference"] is not None:
            images = [load_reference_image(options["reference"])]
            source = str(options["reference"])
        else:
            path = Path(options["reference_cache"] or self.train_cache)
            cache = PatchCache(path)
            n = min(int(options["n_patches"]), len(cache))
            rng = np.random.default_rng(options["seed"])
            chosen = np.sort(rng.choice(len(cache), size=n, replace=False))
            images = [cache[int(i)][0] for i in chosen]
            source = f"{n} patches of {path} (seed {options['seed']})"
        log.info("fitting %s stain normalisation to %s", options["method"], source)
        return normalizer.fit(images)

    @property
    def randstain(self) -> dict[str, Any] | None:
        """The RandStainNA arguments (``distribution`` fitted on first use from ``n_patches``
        seeded patches of ``transforms.randstain.cache``), or None when it is off."""
        options = self.randstain_options
        if options is None:
            return None
        if self._randstain is None:
            cache = PatchCache(Path(options["cache"]))
            n = min(int(options["n_patches"]), len(cache))
            rng = np.random.default_rng(options["seed"])
            chosen = np.sort(rng.choice(len(cache), size=n, replace=False))
            distribution = fit_lab_distribution([cache[int(i)][0] for i in chosen])
            log.info(
                "RandStainNA: stain distribution of %d patches of %s: %s",
                n, options["cache"], distribution.as_dict(),
            )  # fmt: skip
            self._randstain = {
                "distribution": distribution, "spread": options["spread"], "p": options["p"],
            }  # fmt: skip
        return self._randstain

    def train_transform(self) -> Any:
        """The training pipeline (augmentations from ``transforms``), seeded by ``seed``."""
        return build_train_transform(
            self.preprocess, **self.transform_options, randstain=self.randstain, seed=self.seed
        )

    def eval_transform(self) -> Any:
        """The validation/test pipeline: [centre crop to ``transforms.crop``] +
        :meth:`Preprocess.apply` (stain normalisation, normalisation)."""
        return build_eval_transform(self.preprocess, crop=self.transform_options.get("crop"))

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, dataset: CacheDataset | None, *, train: bool, name: str) -> DataLoader:
        if dataset is None:
            raise ConfigError(f"{name}_dataloader() before setup(): call setup() first")
        drop_last = False
        if train and self.drop_last:
            if len(dataset) >= self.batch_size:
                drop_last = True  # every step the same batch size (BatchNorm, LR per sample)
            else:
                log.warning(
                    "training set has %d patches < batch_size=%d: one smaller batch per epoch",
                    len(dataset),
                    self.batch_size,
                )
        generator = torch.Generator()
        generator.manual_seed(self.seed if train else self.seed + 1)
        workers = self.num_workers > 0
        sampler = self._train_sampler(dataset) if train else self._eval_sampler(dataset, name)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers,
            generator=generator,  # the workers' base seed (training: EpochSampler seeds each item)
        )

    def _train_sampler(self, dataset: CacheDataset) -> EpochSampler:
        """Shuffled by (seed, epoch) alone, each patch augmented by (seed, epoch, position): a
        run resumed from an epoch boundary trains on exactly the batches of an uninterrupted
        one (:mod:`lymphnode.data.samplers`). Under DDP this process's share of the epoch."""
        trainer = getattr(self, "trainer", None)  # set by Lightning when it uses this module
        world = 1 if trainer is None else max(1, int(trainer.world_size))
        rank = 0 if trainer is None else int(trainer.global_rank)
        return EpochSampler(dataset, self.seed, num_replicas=world, rank=rank)

    def _eval_sampler(
        self, dataset: CacheDataset, name: str
    ) -> UnrepeatedDistributedSampler | None:
        """Under DDP, each validation/test patch on exactly one process (rank r: patches r,
        r + world, ...; the processes' last batches may differ by one patch). Lightning's own
        DistributedSampler pads the set to a multiple of the processes with repeated patches, so
        the pooled metrics would count some patches twice. None on one process (or with fewer
        patches than processes, where Lightning's padding is kept: a process without a batch
        would stall the others)."""
        trainer = getattr(self, "trainer", None)  # set by Lightning when it uses this module
        if trainer is None or int(trainer.world_size) <= 1:
            return None
        world = int(trainer.world_size)
        if len(dataset) < world:
            log.warning(
                "%s set has %d patches < %d processes: Lightning repeats some so that every "
                "process gets one, and the %s metrics count those twice",
                name, len(dataset), world, name,
            )  # fmt: skip
            return None
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=world, rank=int(trainer.global_rank), shuffle=False
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch), augmented per patch and epoch; drops an incomplete last
        batch when it can."""
        return self._loader(self.train_dataset, train=True, name="train")

    def val_dataloader(self) -> DataLoader:
        """In cache order, no augmentation; under DDP every patch on one process."""
        return self._loader(self.val_dataset, train=False, name="val")


# -------------------------------------------------------------------------------- pretrain
class PretrainDataModule(_CacheDataModule):
    """Reconstruction pretraining on the unlabeled cache (images only, masks never read).

    Args:
        cache_dir: the unlabeled patch cache.
        val_fraction: share of its patches held out for validation, in (0, 1); at least one patch
            each side. A seeded permutation of patch positions (patches of one slide can fall on
            both sides: reconstruction needs no labels, so this leaks nothing the task uses).
        seed: seed of the split, the shuffling, the workers and the augmentations.
        batch_size, num_workers: DataLoader settings.
        pin_memory: None -> True when CUDA is available.
        persistent_workers: keep workers between epochs (only used when num_workers > 0).
        drop_last: drop an incomplete last training batch (when at least one full batch exists).
        transforms: ``{d4, color_jitter, hed, crop}`` for :func:`build_train_transform`; with
            ``crop`` (px) training uses random crops of that side, validation and test the centre
            crop (the input size the network trains on and ``infer`` tiles with: the contract's
            ``patch_size``).
        normalize: ``{"mean", "std"}`` in 0..1 units (None: 0.5/0.5).
        stain_norm: null, or ``{method: macenko|reinhard, reference: image path|null,
            reference_cache: path|null, n_patches: 32, seed: 0, options: {}}``.
        views: images per patch (1; 2 for a joint-embedding pretext: items then also hold
            ``image2``, a second independent draw of the augmentations, in training and
            validation).
        view_transforms: the views' augmentations when ``views > 1`` (keys as ``transforms``;
            None: ``transforms``). Their ``crop`` must equal ``transforms.crop`` (the input size
            the contract records).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = True,
        transforms: Mapping[str, Any] | None = None,
        normalize: Mapping[str, Sequence[float]] | None = None,
        stain_norm: Mapping[str, Any] | None = None,
        views: int = 1,
        view_transforms: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            train_cache=cache_dir,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
            transforms=transforms,
            normalize=normalize,
            stain_norm=stain_norm,
        )
        if isinstance(val_fraction, bool) or not (
            isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0
        ):
            raise ConfigError(f"val_fraction={val_fraction!r} is invalid: expected in (0, 1)")
        self.cache_dir = Path(cache_dir)
        self.val_fraction = float(val_fraction)
        self.views = validate.integer("views", views, 1)
        self.view_options: dict[str, Any] | None = None
        if view_transforms is not None:
            self.view_options = _transform_options(view_transforms)
            if self.view_options.pop("randstain", None) is not None:
                raise ConfigError(
                    "view_transforms.randstain is set: RandStainNA is configured once, in "
                    "transforms.randstain (it applies to the views too)"
                )
            crop = self.transform_options.get("crop")
            if self.view_options.setdefault("crop", crop) != crop:
                raise ConfigError(
                    f"view_transforms.crop={self.view_options['crop']} differs from "
                    f"transforms.crop={crop}: the views must have the network's input size"
                )
            build_train_transform(Preprocess(0, 1), **self.view_options)  # validates them now

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) sorted cache positions, from a permutation seeded by ``seed``."""
        n = len(PatchCache(self.cache_dir))
        if n < 2:
            raise ConfigError(
                f"unlabeled cache {self.cache_dir} has {n} patch(es): expected at least 2 to "
                "split off a validation set"
            )
        n_val = min(max(1, round(n * self.val_fraction)), n - 1)
        order = np.random.default_rng([self.seed, n]).permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def setup(self, stage: str | None = None) -> None:
        """Build the train and validation datasets (idempotent)."""
        if self.train_dataset is not None:
            return
        train, val = self.split()
        if self.views == 1:
            train_tf, val_tf = self.train_transform(), self.eval_transform()
        else:  # every view augmented, validation too (identical views would make the loss trivial)
            options = self.view_options if self.view_options is not None else self.transform_options
            stain = self.randstain
            train_tf = build_train_transform(
                self.preprocess, **options, randstain=stain, seed=self.seed
            )
            val_tf = build_train_transform(
                self.preprocess, **options, randstain=stain, seed=self.seed + 1
            )
        self.train_dataset = CacheDataset(self.cache_dir, train, train_tf, False, self.views)
        self.val_dataset = CacheDataset(self.cache_dir, val, val_tf, False, self.views)
        log.info(
            "pretraining data: %d train / %d validation patches of %s",
            len(train),
            len(val),
            self.cache_dir,
        )


# -------------------------------------------------------------------------------- finetune
class FinetuneDataModule(_CacheDataModule):
    """Fine-tuning on ``labeled_size`` labeled patches, fold ``fold`` of ``folds`` for validation.

    The subset is :func:`stratified_subset` of the labeled cache's classes with (``labeled_size``,
    ``seed``), dealt into folds by :func:`stratified_folds`: identical for every fold and for
    pretrained and scratch runs, nested across sizes. ``labeled_size`` must be a multiple of
    ``folds`` (equal validation folds: with the paper's 40/80/120/200 and 5 folds, 8/16/24/40
    patches), and every class must get at least ``folds`` patches (each validation fold holds both
    classes).

    Args:
        labeled_dir: the labeled patch cache (with masks) the subset is drawn from.
        test_dir: the test patch cache (with masks; held-out slides), used whole.
        labeled_size: patches in the subset (train + validation).
        fold: the validation fold, 0..folds-1.
        folds: number of folds (>= 2).
        seed: seed of the shuffling, the workers and the augmentations.
        subset_seed: seed of the labeled subset and its folds (None: ``seed``, as before it had
            its own key), so that a seed sweep can separate subset variance from init variance.
        fold_by: ``"patch"`` (the paper: class-stratified folds of patches) or ``"slide"``
            (each fold holds whole slides, so a validation fold's patches come from slides that
            none of its training patches come from; folds are then of unequal size and need at
            least ``folds`` slides in the subset).
        unlabeled_dir: an unlabeled cache (the pretraining pool) for semi-supervised
            fine-tuning (``task.semi``): each training batch is then ``{"labeled": batch,
            "unlabeled": batch}``, the unlabeled patches with the training augmentations (the
            weak view), shuffled by (seed, epoch); an epoch is still one pass over the labeled
            patches. None (default): labeled batches only.
        other arguments: as :class:`PretrainDataModule`.

    Raises:
        ConfigError: bad labeled_size / fold / folds (also, at setup, labeled_size larger than
            the labeled cache or too few patches of a class).
        CacheError: missing caches (at setup or when ``patch_size``/``level`` are read), caches
            without masks, labeled and test caches with different patch sizes or levels.
    """

    def __init__(
        self,
        labeled_dir: str | Path,
        test_dir: str | Path,
        labeled_size: int = 40,
        fold: int = 0,
        folds: int = 5,
        seed: int = 0,
        subset_seed: int | None = None,
        fold_by: str = "patch",
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = True,
        transforms: Mapping[str, Any] | None = None,
        normalize: Mapping[str, Sequence[float]] | None = None,
        stain_norm: Mapping[str, Any] | None = None,
        unlabeled_dir: str | Path | None = None,
    ) -> None:
        super().__init__(
            train_cache=labeled_dir,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
            transforms=transforms,
            normalize=normalize,
            stain_norm=stain_norm,
        )
        self.labeled_dir = Path(labeled_dir)
        self.test_dir = Path(test_dir)
        self.unlabeled_dir = None if unlabeled_dir is None else Path(unlabeled_dir)
        self.unlabeled_dataset: CacheDataset | None = None
        self.folds = validate.integer("folds", folds, 2)
        self.labeled_size = validate.integer("labeled_size", labeled_size, 1)
        self.fold = validate.integer("fold", fold, 0, self.folds - 1, where=f"folds={self.folds}: ")
        self.subset_seed = (
            self.seed if subset_seed is None else validate.integer("subset_seed", subset_seed, 0)
        )
        if fold_by not in FOLD_BY:
            raise ConfigError(f"fold_by={fold_by!r} is invalid: expected one of {list(FOLD_BY)}")
        self.fold_by = fold_by
        if self.fold_by == "patch" and self.labeled_size % self.folds:
            lower = self.labeled_size // self.folds * self.folds
            raise ConfigError(
                f"labeled_size={self.labeled_size} is not a multiple of folds={self.folds}: "
                f"expected equal folds, e.g. labeled_size={lower or self.folds} or "
                f"{lower + self.folds}"
            )
        self._folds: list[np.ndarray] | None = None

    def fold_indices(self) -> list[np.ndarray]:
        """The ``folds`` folds of the subset: sorted labeled-cache positions per fold."""
        if self._folds is None:
            cache = PatchCache(self.labeled_dir)
            if not cache.has_masks:
                raise CacheError(
                    f"labeled cache {self.labeled_dir} has no masks: expected a cache built from "
                    "annotated slides"
                )
            if self.labeled_size > len(cache):
                raise ConfigError(
                    f"labeled_size={self.labeled_size} is larger than the labeled cache "
                    f"{self.labeled_dir} ({len(cache)} patches): expected 1..{len(cache)}"
                )
            labels = _class_labels(cache)
            per_class = stratified_subset(
                labels, self.labeled_size, self.subset_seed, minimum=self.folds
            )
            if self.fold_by == "slide":
                slides = np.asarray(cache.index["slide"])
                self._folds = slide_folds(per_class, slides, self.folds, self.subset_seed)
                _warn_single_class_folds(self._folds, labels, self.labeled_dir)
                return self._folds
            for c, chosen in zip(CLASSES, per_class):
                if len(chosen) < self.folds:
                    available = int(np.sum(labels == c))
                    raise ConfigError(
                        f"labeled_size={self.labeled_size} gives {len(chosen)} {CLASS_NAMES[c]} "
                        f"patch(es) (the labeled cache {self.labeled_dir} has {available} of "
                        f"{len(cache)}), fewer than folds={self.folds}: every validation fold "
                        "needs each class; expected "
                        + (
                            "fewer folds (or more labeled patches of that class)"
                            if available < self.folds
                            else "a larger labeled_size or fewer folds"
                        )
                    )
            self._folds = stratified_folds(per_class, self.folds)
        return self._folds

    def subset_indices(self) -> np.ndarray:
        """All ``labeled_size`` positions of the subset, sorted."""
        return np.sort(np.concatenate(self.fold_indices()))

    def train_indices(self) -> np.ndarray:
        """Positions of the training folds (all but ``fold``), sorted."""
        folds = self.fold_indices()
        return np.sort(np.concatenate([f for k, f in enumerate(folds) if k != self.fold]))

    def val_indices(self) -> np.ndarray:
        """Positions of the validation fold ``fold``, sorted."""
        return self.fold_indices()[self.fold]

    def _check_test_cache(self) -> None:
        test = PatchCache(self.test_dir)
        if not test.has_masks:
            raise CacheError(
                f"test cache {self.test_dir} has no masks: expected a cache built from annotated "
                "slides"
            )
        if test.patch_size != self.cache_patch_size or _cache_level(test) != self.level:
            raise CacheError(
                f"test cache {self.test_dir} has patch_size={test.patch_size}, "
                f"level={_cache_level(test)}; the labeled cache {self.labeled_dir} has "
                f"patch_size={self.cache_patch_size}, level={self.level}: expected the same"
            )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (idempotent): fit/validate -> train + val,
        test -> test."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            train, val = self.train_indices(), self.val_indices()
            self.train_dataset = CacheDataset(self.labeled_dir, train, self.train_transform(), True)
            self.val_dataset = CacheDataset(self.labeled_dir, val, self.eval_transform(), True)
            if self.unlabeled_dir is not None:
                unlabeled = PatchCache(self.unlabeled_dir)
                if unlabeled.patch_size < (self.transform_options.get("crop") or self.patch_size):
                    raise CacheError(
                        f"unlabeled cache {self.unlabeled_dir} has {unlabeled.patch_size} px "
                        f"patches: expected at least the training input ({self.patch_size} px)"
                    )
                self.unlabeled_dataset = CacheDataset(
                    self.unlabeled_dir, None, self.train_transform(), False
                )
            log.info(
                "fine-tuning data: labeled_size=%d subset_seed=%d fold %d/%d by %s -> %d train / %d "
                "validation patches of %s",
                self.labeled_size,
                self.subset_seed,
                self.fold,
                self.folds,
                self.fold_by,
                len(train),
                len(val),
                self.labeled_dir,
            )
        if stage in (None, "test") and self.test_dataset is None:
            self._check_test_cache()
            self.test_dataset = CacheDataset(self.test_dir, None, self.eval_transform(), True)

    def train_dataloader(self) -> Any:
        """The labeled batches; with ``unlabeled_dir`` a ``CombinedLoader`` of ``{"labeled",
        "unlabeled"}`` batches, as many as labeled ones per epoch (``min_size``)."""
        labeled = self._loader(self.train_dataset, train=True, name="train")
        if self.unlabeled_dir is None:
            return labeled
        unlabeled = self._loader(self.unlabeled_dataset, train=True, name="unlabeled")
        return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled}, mode="min_size")

    def test_dataloader(self) -> DataLoader:
        """The whole test cache in cache order, no augmentation; under DDP every patch on one
        process (the pooled metrics count each test patch once)."""
        return self._loader(self.test_dataset, train=False, name="test")


__all__ = [
    "FOLD_BY",
    "FinetuneDataModule",
    "PretrainDataModule",
    "slide_folds",
    "stratified_folds",
    "stratified_subset",
]

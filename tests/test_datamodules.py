"""Tests of lymphnode.data.datasets and lymphnode.data.datamodules on tiny caches written with the
real CacheWriter."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from lymphnode.core.errors import CacheError, ConfigError
from lymphnode.data.datamodules import (
    FinetuneDataModule,
    PretrainDataModule,
    slide_folds,
    stratified_folds,
    stratified_subset,
)
from lymphnode.data.datasets import CacheDataset
from lymphnode.models.preprocess import Preprocess
from lymphnode.patches.cache import CacheWriter

P = 16  # patch side (px)
NO_AUGMENT = {"d4": False, "color_jitter": None}


def _patch(i: int, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch ``i``: green = i % 256 and blue = i // 256 (so a batch reveals which patch it is),
    red = 250 exactly on the mask (an asymmetric L for tumor, nothing for non-tumor); H&E-like
    background elsewhere so that stain normalisation can be fitted."""
    mask = np.zeros((P, P), np.uint8)
    if label == 1:
        mask[2:10, 3] = 1
        mask[9, 3:8] = 1
    image = np.empty((P, P, 3), np.uint8)
    image[..., 0] = np.where(mask == 1, 250, 150)
    image[..., 1] = i % 256
    image[..., 2] = 100 + i // 256
    return image, mask


def write_cache(
    path: Path,
    labels_per_slide: Sequence[Sequence[int]],
    *,
    masks: bool = True,
    codec: str = "raw",
    level: int = 0,
) -> Path:
    """A cache of P x P patches, one shard per slide; patch i gets label labels[i]."""
    writer = CacheWriter(path, {"test": True}, codec=codec, patch_size=P, has_masks=masks)
    slide_ids = []
    i = 0
    for s, labels in enumerate(labels_per_slide):
        slide_id = f"slide_{s:03d}"
        slide_ids.append(slide_id)
        with writer.slide(slide_id, n=len(labels)) as shard:
            for label in labels:
                image, mask = _patch(i, label)
                shard.add(image, mask if masks else None, x=i, y=0, level=level, label=label)
                i += 1
        writer.commit(slide_id, shard.info)
    writer.finalize(slide_ids)
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    # 120 labeled patches on 3 slides: 48 tumor (40%), 72 non-tumor
    labeled = [[1 if (j + s) % 5 < 2 else 0 for j in range(40)] for s in range(3)]
    return {
        "labeled": write_cache(root / "labeled", labeled),
        "test": write_cache(root / "test", [[0, 1, 0, 1, 1, 0]], codec="jpeg"),
        "unlabeled": write_cache(root / "unlabeled", [[-1] * 25, [-1] * 25], masks=False),
        # 60 patches, only 3 tumor
        "rare": write_cache(root / "rare", [[1, 1, 1] + [0] * 57]),
        "level1": write_cache(root / "level1", [[0, 1] * 3], level=1),
    }


def finetune(caches: dict[str, Path], **kwargs: object) -> FinetuneDataModule:
    options: dict[str, object] = {
        "labeled_dir": caches["labeled"],
        "test_dir": caches["test"],
        "labeled_size": 40,
        "fold": 0,
        "folds": 5,
        "seed": 0,
        "batch_size": 4,
    }
    options.update(kwargs)
    return FinetuneDataModule(**options)  # type: ignore[arg-type]


def labels_of(caches: dict[str, Path]) -> np.ndarray:
    from lymphnode.patches.cache import PatchCache

    return PatchCache(caches["labeled"]).labels


# ----------------------------------------------------------------------------- the subset
def test_subset_is_the_same_for_every_fold(caches: dict[str, Path]) -> None:
    subsets = [finetune(caches, fold=k).subset_indices() for k in range(5)]
    assert all(np.array_equal(subsets[0], s) for s in subsets[1:])
    vals = [finetune(caches, fold=k).val_indices() for k in range(5)]
    assert all(
        np.array_equal(vals[k], finetune(caches, fold=0).fold_indices()[k]) for k in range(5)
    )


def test_folds_are_disjoint_equal_and_cover_the_subset(caches: dict[str, Path]) -> None:
    dm = finetune(caches, labeled_size=40, fold=2)
    folds = dm.fold_indices()
    assert [len(f) for f in folds] == [8] * 5
    union = np.concatenate(folds)
    assert len(np.unique(union)) == 40
    assert np.array_equal(np.sort(union), dm.subset_indices())
    assert np.array_equal(dm.val_indices(), folds[2])
    assert np.array_equal(
        np.sort(np.concatenate([dm.train_indices(), dm.val_indices()])), np.sort(union)
    )
    assert not set(dm.train_indices()) & set(dm.val_indices())


def test_subset_and_folds_are_class_stratified(caches: dict[str, Path]) -> None:
    labels = labels_of(caches)
    for size in (40, 80, 120):
        dm = finetune(caches, labeled_size=size)
        subset = dm.subset_indices()
        assert labels[subset].sum() == round(size * 0.4)  # the cache is 40% tumor
        tumor_per_fold = [int(labels[f].sum()) for f in dm.fold_indices()]
        assert max(tumor_per_fold) - min(tumor_per_fold) <= 1


def test_subsets_are_nested_and_depend_on_the_seed(caches: dict[str, Path]) -> None:
    small = set(finetune(caches, labeled_size=40).subset_indices())
    large = set(finetune(caches, labeled_size=80).subset_indices())
    assert small < large
    other_seed = set(finetune(caches, labeled_size=40, seed=1).subset_indices())
    assert other_seed != small


def test_subset_ignores_the_loader_and_augmentation_settings(caches: dict[str, Path]) -> None:
    a = finetune(caches, batch_size=2, num_workers=0, transforms={"hed": True})
    b = finetune(caches, batch_size=8, fold=4, transforms=NO_AUGMENT)
    assert np.array_equal(a.subset_indices(), b.subset_indices())


def test_split_functions_directly() -> None:
    labels = np.array([0] * 30 + [1] * 10)
    per_class = stratified_subset(labels, 20, seed=3)
    assert [len(p) for p in per_class] == [15, 5]
    assert all(labels[p].tolist() == [c] * len(p) for c, p in zip((0, 1), per_class))
    folds = stratified_folds(per_class, 5)
    assert [len(f) for f in folds] == [4] * 5
    assert [int(labels[f].sum()) for f in folds] == [1] * 5


def test_a_rare_class_gets_one_patch_per_fold_and_subsets_stay_nested() -> None:
    # the real dev set's slide protocol: 24 tumour and 7 normal pool patches, 5 folds
    labels = np.array([1] * 24 + [0] * 7)
    sizes = {n: stratified_subset(labels, n, seed=0, minimum=5) for n in (10, 15, 20, 30)}
    assert [len(p) for p in sizes[10]] == [5, 5]  # proportional would give 2 normal + 8 tumour
    assert [len(p) for p in sizes[30]] == [7, 23]  # above the minimum: proportional (6.8 -> 7)
    assert [len(p) for p in stratified_subset(labels, 10, seed=0)] == [2, 8]  # no minimum
    for small, large in ((10, 15), (15, 20), (20, 30)):
        for c in (0, 1):
            assert set(sizes[small][c]) <= set(sizes[large][c])
    # a class with fewer patches than the minimum gives all it has
    assert [len(p) for p in stratified_subset(np.array([1] * 20 + [0] * 3), 10, 0, 5)] == [3, 7]


# ------------------------------------------------------------------------------ errors
def test_labeled_size_larger_than_cache_raises(caches: dict[str, Path]) -> None:
    with pytest.raises(
        ConfigError, match=r"labeled_size=200 is larger than the labeled cache .* \(120 patches\)"
    ):
        finetune(caches, labeled_size=200).setup("fit")


@pytest.mark.parametrize("fold", [5, -1, 1.5])
def test_fold_out_of_range_raises(caches: dict[str, Path], fold: object) -> None:
    with pytest.raises(
        ConfigError, match=rf"folds=5: fold must be an integer in 0\.\.4, got {fold}"
    ):
        finetune(caches, fold=fold)


@pytest.mark.parametrize(("size", "match"), [(42, "or 45"), (3, r"labeled_size=5 or")])
def test_labeled_size_not_a_multiple_of_folds_raises(
    caches: dict[str, Path], size: int, match: str
) -> None:
    with pytest.raises(
        ConfigError, match=rf"labeled_size={size} is not a multiple of folds=5.*{match}"
    ):
        finetune(caches, labeled_size=size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labeled_size": 0}, r"labeled_size must be an integer >= 1, got 0"),
        ({"folds": 1}, r"folds must be an integer >= 2, got 1"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -2}, r"num_workers must be an integer >= 0, got -2"),
        ({"transforms": {"flip": True}}, r"transforms has unknown key\(s\) \['flip'\]"),
        ({"normalize": {"mean": [0.5] * 3, "std": [0] * 3}}, r"normalize.std=.* > 0"),
        ({"stain_norm": {"method": "vahadane"}}, r"stain_norm.method='vahadane' is invalid"),
        ({"stain_norm": {"method": "macenko", "n": 3}}, r"stain_norm has unknown key\(s\) \['n'\]"),
        (
            {"stain_norm": {"method": "macenko", "n_patches": 0}},
            r"stain_norm.n_patches must be an integer >= 1, got 0",
        ),
    ],
)
def test_bad_settings_raise(caches: dict[str, Path], kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        finetune(caches, **kwargs)


def test_too_few_patches_of_a_class_raises(caches: dict[str, Path]) -> None:
    dm = finetune(caches, labeled_dir=caches["rare"], labeled_size=40)
    with pytest.raises(
        ConfigError,
        match=r"labeled_size=40 gives 3 tumor patch\(es\) .* 3 of 60.*fewer than folds=5.*"
        r"expected fewer folds",
    ):
        dm.setup("fit")


def test_missing_caches_raise_cache_error(caches: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"patch cache not found: .*nowhere"):
        finetune(caches, labeled_dir=tmp_path / "nowhere").setup("fit")
    with pytest.raises(CacheError, match=r"patch cache not found: .*nowhere"):
        finetune(caches, test_dir=tmp_path / "nowhere").setup("test")
    with pytest.raises(CacheError, match=r"patch cache not found: .*nowhere"):
        _ = PretrainDataModule(tmp_path / "nowhere").patch_size


def test_caches_without_masks_or_of_another_level_raise(caches: dict[str, Path]) -> None:
    with pytest.raises(CacheError, match=r"labeled cache .*unlabeled has no masks"):
        finetune(caches, labeled_dir=caches["unlabeled"], labeled_size=5).setup("fit")
    with pytest.raises(CacheError, match=r"test cache .*unlabeled has no masks"):
        finetune(caches, test_dir=caches["unlabeled"]).setup("test")
    with pytest.raises(CacheError, match=r"test cache .*level1 has patch_size=16, level=1"):
        finetune(caches, test_dir=caches["level1"]).setup("test")
    with pytest.raises(CacheError, match=r"has no masks, but with_masks=True"):
        CacheDataset(caches["unlabeled"], with_masks=True)


def test_dataset_index_out_of_range_raises(caches: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"indices include \[50\]: .* has 50 patches"):
        CacheDataset(caches["unlabeled"], [0, 50])


@pytest.mark.parametrize("fraction", [0, 1, 1.5, True])
def test_bad_val_fraction_raises(caches: dict[str, Path], fraction: object) -> None:
    with pytest.raises(
        ConfigError, match=rf"val_fraction={fraction} is invalid: expected in \(0, 1\)"
    ):
        PretrainDataModule(caches["unlabeled"], val_fraction=fraction)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ loaders
def _first_batch(dm: FinetuneDataModule | PretrainDataModule) -> dict[str, torch.Tensor]:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_batches_have_the_agreed_format(caches: dict[str, Path]) -> None:
    batch = _first_batch(finetune(caches, batch_size=4))
    assert set(batch) == {"image", "mask", "index"}
    assert batch["image"].shape == (4, 3, P, P) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, P, P) and batch["mask"].dtype == torch.float32
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["index"].dtype == torch.int64
    unlabeled = _first_batch(PretrainDataModule(caches["unlabeled"], batch_size=4))
    assert set(unlabeled) == {"image", "index"}


def test_batches_serve_the_indexed_patches_and_masks_follow_augmentation(
    caches: dict[str, Path],
) -> None:
    dm = finetune(caches, labeled_size=80, batch_size=16, transforms={"color_jitter": None})
    batch = _first_batch(dm)
    image = (batch["image"] * 0.5 + 0.5) * 255  # default normalisation 0.5 / 0.5
    green = image[:, 1].round().to(torch.int64)
    assert torch.all(green == (batch["index"] % 256)[:, None, None])  # the served patch
    red_marks = (image[:, 0] > 200).float()
    assert torch.equal(red_marks, batch["mask"][:, 0])  # mask moved with the image
    assert set(batch["index"].tolist()) <= set(dm.train_indices().tolist())


def test_dataloader_with_two_workers_opens_the_cache_in_the_workers(
    caches: dict[str, Path],
) -> None:
    dm = finetune(caches, labeled_size=40, batch_size=4, num_workers=2, persistent_workers=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    seen = torch.cat([b["index"] for b in loader])
    assert sorted(seen.tolist()) == sorted(dm.train_indices().tolist())  # 32 = 8 batches of 4
    assert dm.train_dataset._cache is None  # the main process never opened it
    state = pickle.loads(pickle.dumps(dm.train_dataset))
    assert state._cache is None and len(state) == 32


def test_same_seed_same_first_batch_with_workers(caches: dict[str, Path]) -> None:
    def first(seed: int, workers: int) -> dict[str, torch.Tensor]:
        dm = finetune(
            caches, seed=seed, batch_size=4, num_workers=workers, transforms={"hed": True}
        )
        return _first_batch(dm)

    for workers in (0, 2):
        a, b = first(0, workers), first(0, workers)
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    c = first(1, 2)
    assert not torch.equal(a["image"], c["image"])


def test_workers_do_not_repeat_each_others_augmentations(caches: dict[str, Path]) -> None:
    dm = PretrainDataModule(
        caches["unlabeled"], batch_size=1, num_workers=2, transforms={"color_jitter": True}
    )
    dm.setup("fit")
    dm.train_dataset.indices = np.zeros(4, np.int64)  # the same patch four times
    images = [b["image"] for b in dm.train_dataloader()]
    assert len({img.numpy().tobytes() for img in images}) == 4


def test_drop_last_only_when_a_full_batch_exists(caches: dict[str, Path]) -> None:
    dm = finetune(caches, batch_size=5)
    dm.setup("fit")
    assert dm.train_dataloader().drop_last and len(dm.train_dataloader()) == 6  # 32 // 5
    assert not dm.val_dataloader().drop_last
    big = finetune(caches, batch_size=64)
    big.setup("fit")
    assert not big.train_dataloader().drop_last and len(big.train_dataloader()) == 1
    dm0 = finetune(caches, num_workers=0, persistent_workers=True)
    dm0.setup("fit")
    assert dm0.train_dataloader().persistent_workers is False


def test_test_loader_is_the_whole_test_cache_in_order(caches: dict[str, Path]) -> None:
    dm = finetune(caches, batch_size=4)
    dm.setup("test")
    indices = torch.cat([b["index"] for b in dm.test_dataloader()])
    assert indices.tolist() == list(range(6))
    with pytest.raises(ConfigError, match=r"train_dataloader\(\) before setup"):
        finetune(caches).train_dataloader()


def test_validation_is_deterministic_and_unaugmented(caches: dict[str, Path]) -> None:
    dm = finetune(caches, transforms={"hed": True})
    dm.setup("fit")
    a = next(iter(dm.val_dataloader()))
    b = next(iter(dm.val_dataloader()))
    assert torch.equal(a["image"], b["image"])
    green = ((a["image"][:, 1] * 0.5 + 0.5) * 255).round().to(torch.int64)
    assert torch.all(green == (a["index"] % 256)[:, None, None])


def test_pretrain_split_is_seeded_disjoint_and_complete(caches: dict[str, Path]) -> None:
    train, val = PretrainDataModule(caches["unlabeled"], val_fraction=0.2, seed=4).split()
    assert len(val) == 10 and len(train) == 40
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(50))
    again = PretrainDataModule(caches["unlabeled"], val_fraction=0.2, seed=4).split()
    assert np.array_equal(again[1], val)
    other = PretrainDataModule(caches["unlabeled"], val_fraction=0.2, seed=5).split()
    assert not np.array_equal(other[1], val)


def test_preprocess_contract_from_the_manifest_and_the_config(caches: dict[str, Path]) -> None:
    dm = finetune(caches, normalize={"mean": [0.7, 0.5, 0.6], "std": [0.2, 0.2, 0.2]})
    assert dm.normalize == {"mean": [0.7, 0.5, 0.6], "std": [0.2, 0.2, 0.2]}
    assert dm.patch_size == P and dm.level == 0
    assert dm.preprocess == Preprocess(level=0, patch_size=P, mean=(0.7, 0.5, 0.6),
                                       std=(0.2, 0.2, 0.2), stain=None)  # fmt: skip
    assert PretrainDataModule(caches["unlabeled"]).preprocess.mean == (0.5, 0.5, 0.5)
    assert PretrainDataModule(caches["unlabeled"]).normalize == {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    assert finetune(caches, labeled_dir=caches["level1"], labeled_size=5).level == 1


def test_stain_normalisation_is_fitted_on_seeded_training_patches(caches: dict[str, Path]) -> None:
    options = {"method": "reinhard", "n_patches": 8, "seed": 0}
    a = finetune(caches, stain_norm=options, transforms=NO_AUGMENT)
    b = finetune(caches, stain_norm=options, transforms=NO_AUGMENT, fold=3, seed=9)
    assert np.allclose(a.stain_normalizer.mean, b.stain_normalizer.mean)  # not the run seed
    a.setup()
    val = next(iter(a.val_dataloader()))["image"]
    plain = finetune(caches, transforms=NO_AUGMENT)
    plain.setup()
    assert not torch.equal(val, next(iter(plain.val_dataloader()))["image"])
    test = next(iter(a.test_dataloader()))["image"]
    assert torch.isfinite(test).all()
    state = a.preprocess.stain  # the fitted state travels in the contract (and the checkpoints)
    assert state["method"] == "reinhard" and np.allclose(state["mean"], a.stain_normalizer.mean)
    assert plain.preprocess.stain is None


def test_stain_reference_from_an_image_file(caches: dict[str, Path], tmp_path: Path) -> None:
    import cv2

    image, _ = _patch(7, 1)
    cv2.imwrite(str(tmp_path / "ref.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    dm = finetune(caches, stain_norm={"method": "reinhard", "reference": str(tmp_path / "ref.png")})
    assert dm.stain_normalizer is not None and dm.stain_normalizer.mean is not None
    with pytest.raises(ConfigError, match="does not exist"):
        _ = finetune(
            caches, stain_norm={"method": "reinhard", "reference": "no.png"}
        ).stain_normalizer


def test_unknown_labels_are_taken_from_masks(tmp_path: Path) -> None:
    from lymphnode.patches.cache import PatchCache

    path = tmp_path / "unknown"
    writer = CacheWriter(path, {}, patch_size=P, has_masks=True)
    with writer.slide("s0", n=20) as shard:
        for i in range(20):
            image, mask = _patch(i, i % 2)
            shard.add(image, mask, x=-1, y=-1, level=0, label=-1)
    writer.commit("s0", shard.info)
    writer.finalize(["s0"])
    assert (PatchCache(path).labels == -1).all()
    dm = FinetuneDataModule(path, path, labeled_size=10, folds=5)
    subset = dm.subset_indices()
    assert sum(i % 2 for i in subset) == 5  # stratified by the mask-derived classes


# ------------------------------------------------------------------------ seeds, folds, crops
def test_seed_alone_keeps_the_subset_and_subset_seed_alone_changes_it(
    caches: dict[str, Path],
) -> None:
    base = finetune(caches, seed=0, subset_seed=0)
    assert np.array_equal(
        finetune(caches, seed=0).subset_indices(), base.subset_indices()
    )  # default
    other_init = finetune(caches, seed=7, subset_seed=0)
    assert np.array_equal(other_init.subset_indices(), base.subset_indices())
    for a, b in zip(other_init.fold_indices(), base.fold_indices()):
        assert np.array_equal(a, b)
    other_subset = finetune(caches, seed=0, subset_seed=7)
    assert not np.array_equal(other_subset.subset_indices(), base.subset_indices())
    assert other_subset.seed == base.seed == 0  # shuffling/augmentation seed unchanged
    with pytest.raises(ConfigError, match=r"subset_seed must be an integer >= 0, got -1"):
        finetune(caches, subset_seed=-1)


def test_slide_folds_keep_every_slide_in_one_fold(caches: dict[str, Path]) -> None:
    from lymphnode.patches.cache import PatchCache

    slides = np.asarray(PatchCache(caches["labeled"]).index["slide"])
    dm = finetune(caches, fold_by="slide", folds=3, labeled_size=42, fold=1)
    folds = dm.fold_indices()
    assert np.array_equal(np.sort(np.concatenate(folds)), dm.subset_indices())
    assert len(dm.subset_indices()) == 42  # not a multiple of folds: allowed by slide
    owners = [set(slides[f].tolist()) for f in folds]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not owners[i] & owners[j]  # no slide in two folds
    train, val = set(slides[dm.train_indices()]), set(slides[dm.val_indices()])
    assert val and train and not train & val  # validation slides unseen in training
    patch = finetune(caches, folds=3, labeled_size=42, fold=1)
    assert np.array_equal(patch.subset_indices(), dm.subset_indices())  # the same subset
    assert any(len(set(slides[f].tolist())) > 1 for f in patch.fold_indices())  # patch folds mix


def test_slide_folds_need_as_many_slides_as_folds(caches: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"fold_by=slide needs at least folds=5 slides.* 3 slide"):
        finetune(caches, fold_by="slide", folds=5).fold_indices()
    with pytest.raises(ConfigError, match=r"fold_by='site' is invalid: expected one of"):
        finetune(caches, fold_by="site")


def test_slide_folds_directly_balance_patches() -> None:
    slides = np.array(["a"] * 6 + ["b"] * 3 + ["c"] * 2 + ["d"] * 1)
    per_class = [np.arange(0, 12, 2), np.arange(1, 12, 2)]
    folds = slide_folds(per_class, slides, 2, seed=0)
    assert sorted(len(f) for f in folds) == [6, 6]  # a | b+c+d
    assert {tuple(sorted(set(slides[f]))) for f in folds} == {("a",), ("b", "c", "d")}


def test_crop_trains_on_random_crops_and_evaluates_on_centre_crops(
    caches: dict[str, Path],
) -> None:
    dm = finetune(caches, transforms={**NO_AUGMENT, "crop": 8})
    assert dm.patch_size == 8 and dm.cache_patch_size == P and dm.preprocess.patch_size == 8
    dm.setup()
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert train["image"].shape[-2:] == (8, 8) and train["mask"].shape[-2:] == (8, 8)
    full = finetune(caches, transforms=NO_AUGMENT)
    full.setup()
    whole = next(iter(full.val_dataloader()))
    assert torch.equal(val["image"], whole["image"][..., 4:12, 4:12])  # the centre crop
    assert torch.equal(val["mask"], whole["mask"][..., 4:12, 4:12])
    with pytest.raises(
        ConfigError, match=r"transforms.crop=32 is larger than the patches of .*16 px"
    ):
        _ = finetune(caches, transforms={"crop": 32}).preprocess

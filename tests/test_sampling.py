"""Tests of lymphnode.patches.sampling: the paper's class-balanced patch sampling."""

from __future__ import annotations

import numpy as np
import pytest

from lymphnode.core.errors import ConfigError, SamplingError
from lymphnode.patches.sampling import NON_TUMOR, TUMOR, UNLABELED, PatchLocation, sample_patches
from lymphnode.wsi.annotations import Annotations
from lymphnode.wsi.tissue import TissueMask

SLIDE = (8192, 8192)  # level-0 (width, height)
PATCH = 300


def square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)


def disk(cx: float, cy: float, r: float, n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


@pytest.fixture
def tissue() -> TissueMask:
    """Tissue in the level-0 box x 1024..7168, y 1024..7168 (mask at downsample 32)."""
    mask = np.zeros((256, 256), bool)
    mask[32:224, 32:224] = True
    return TissueMask(mask, 32.0)


@pytest.fixture
def lesions() -> Annotations:
    """A large lesion with an exclusion hole, and a small one (still larger than a centre region)."""
    return Annotations(
        tumor=[disk(3000, 3000, 900), disk(6000, 5500, 200)],
        exclusion=[disk(3000, 3000, 200)],
    )


def sample(tissue: TissueMask, annotations: Annotations | None, **kw) -> list[PatchLocation]:
    args = {"slide_size": SLIDE, "n": 400, "patch_size": PATCH, "seed": 0}
    args.update(kw)
    return sample_patches(tissue=tissue, annotations=annotations, **args)


def center_fraction(a: Annotations, p: PatchLocation, extent: int = PATCH, frac: float = 0.5):
    c = round(extent * frac)
    off = (extent - c) // 2
    return float(a.mask(p.x + off, p.y + off, c, c).mean())


def test_classes_are_balanced_about_half_and_half(tissue, lesions) -> None:
    patches = sample(tissue, lesions, n=1000)
    share = np.mean([p.label == TUMOR for p in patches])
    assert len(patches) == 1000
    assert 0.45 < share < 0.55  # binomial(1000, 0.5): 3 sd is 0.047
    assert {p.label for p in patches} == {TUMOR, NON_TUMOR}


def test_tumor_probability_sets_the_share_of_tumor_patches(tissue, lesions) -> None:
    patches = sample(tissue, lesions, n=500, tumor_probability=0.2)
    share = np.mean([p.label == TUMOR for p in patches])
    assert 0.14 < share < 0.26


def test_tumor_patches_have_enough_tumor_in_their_central_region(tissue, lesions) -> None:
    tumor = [p for p in sample(tissue, lesions) if p.label == TUMOR]
    fractions = [center_fraction(lesions, p) for p in tumor]
    assert tumor and min(fractions) >= 0.5
    # They are not all deep inside the lesion: borders are sampled too.
    assert min(fractions) < 0.95


def test_tumor_patches_come_from_both_lesions_and_avoid_the_exclusion(tissue, lesions) -> None:
    tumor = [p for p in sample(tissue, lesions, n=600) if p.label == TUMOR]
    centres = np.array([(p.x + PATCH / 2, p.y + PATCH / 2) for p in tumor])
    near_small = np.hypot(centres[:, 0] - 6000, centres[:, 1] - 5500) < 400
    assert 0 < near_small.sum() < len(tumor)
    in_hole = np.hypot(centres[:, 0] - 3000, centres[:, 1] - 3000) < 50
    assert not in_hole.any()


def test_non_tumor_patches_have_no_tumor_pixel_and_enough_tissue(tissue, lesions) -> None:
    normal = [p for p in sample(tissue, lesions) if p.label == NON_TUMOR]
    assert normal
    for p in normal:
        assert not lesions.mask(p.x, p.y, PATCH, PATCH).any()
        assert tissue.fraction(p.x, p.y, PATCH, PATCH) >= 0.5


def test_min_tissue_fraction_one_keeps_patches_fully_inside_tissue(tissue) -> None:
    patches = sample(tissue, None, n=200, min_tissue_fraction=1.0)
    assert all(tissue.fraction(p.x, p.y, PATCH, PATCH) == 1.0 for p in patches)


def test_patches_lie_inside_the_slide(lesions) -> None:
    everywhere = TissueMask(np.ones((256, 256), bool), 32.0)
    patches = sample(everywhere, lesions, n=1000, min_tissue_fraction=0.0)
    xs = np.array([p.x for p in patches])
    ys = np.array([p.y for p in patches])
    assert xs.min() >= 0 and ys.min() >= 0
    assert xs.max() <= SLIDE[0] - PATCH and ys.max() <= SLIDE[1] - PATCH
    assert xs.max() > SLIDE[0] - 2 * PATCH  # the clamp reaches the edge


def test_the_same_seed_gives_the_same_coordinates(tissue, lesions) -> None:
    first = sample(tissue, lesions, seed=7)
    again = sample(tissue, lesions, seed=7)
    other = sample(tissue, lesions, seed=8)
    assert first == again
    assert first != other


def test_slides_without_annotations_give_only_non_tumor_patches(tissue) -> None:
    assert {p.label for p in sample(tissue, None)} == {NON_TUMOR}
    assert {p.label for p in sample(tissue, Annotations(tumor=[]))} == {NON_TUMOR}


def test_unlabeled_mode_gives_tissue_patches_anywhere_without_classes(tissue, lesions) -> None:
    patches = sample(tissue, lesions, n=600, labeled=False)
    assert {p.label for p in patches} == {UNLABELED}
    assert all(tissue.fraction(p.x, p.y, PATCH, PATCH) >= 0.5 for p in patches)
    # No class balancing: tumor appears at about its share of the tissue, not at 50%.
    touching = np.mean([lesions.mask(p.x, p.y, PATCH, PATCH).any() for p in patches])
    assert 0.02 < touching < 0.4


def test_patch_extent_scales_with_the_level_downsample(tissue, lesions) -> None:
    # 150 px at downsample 2 cover 300 level-0 px: the same checks as 300 px at level 0.
    patches = sample(tissue, lesions, n=200, patch_size=150, level_downsample=2.0)
    for p in patches:
        if p.label == TUMOR:
            assert center_fraction(lesions, p, extent=300) >= 0.45  # checked at downsample 2
        else:
            assert not lesions.mask(p.x, p.y, 300, 300, downsample=2.0).any()
    assert max(p.x for p in patches) <= SLIDE[0] - 300


def test_a_lesion_smaller_than_the_quota_raises_sampling_error_with_counts(tissue) -> None:
    tiny = Annotations(tumor=[square(4000, 4000, 40)])  # 40 px: far below half of 150²
    with pytest.raises(
        SamplingError,
        match=r"tumor_x\.tif: could not sample .*max_tries reached after 500 tries.*"
        r"found tumor 0/\d+, non-tumor \d+/\d+",
    ):
        sample(tissue, tiny, n=20, max_tries=500, slide_name="tumor_x.tif")


def test_tumor_outside_the_slide_raises_sampling_error_at_once(tissue) -> None:
    outside = Annotations(tumor=[square(9000, 9000, 500)])
    with pytest.raises(SamplingError, match=r"no tumor pixels inside the slide.*tumor 0/"):
        sample(tissue, outside, n=20)


def test_empty_tissue_mask_raises_sampling_error(lesions) -> None:
    nothing = TissueMask(np.zeros((256, 256), bool), 32.0)
    with pytest.raises(SamplingError, match=r"tissue mask is empty.*non-tumor 0/"):
        sample(nothing, None, n=5)


def test_a_patch_larger_than_the_slide_is_a_config_error(tissue) -> None:
    with pytest.raises(ConfigError, match=r"spans 600 level-0 px, larger than the slide"):
        sample(tissue, None, slide_size=(500, 500), patch_size=300, level_downsample=2.0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n": -1}, r"n \(patches per slide\) must be an integer >= 0, got -1"),
        ({"patch_size": 0}, r"patch_size must be an integer >= 1 px, got 0"),
        (
            {"tumor_probability": 1.5},
            r"tumor_probability must be a finite number in 0\.\.1, got 1.5",
        ),
        ({"center_fraction": 0.0}, r"center_fraction must be a finite number in \(0, 1\], got 0.0"),
        ({"level_downsample": 0.5}, r"level_downsample must be a finite number >= 1, got 0.5"),
        ({"max_tries": 0}, r"max_tries must be an integer >= 1, got 0"),
        ({"n": 2.5}, r"n \(patches per slide\) must be an integer >= 0, got 2.5"),
    ],
)
def test_bad_parameters_are_config_errors(tissue, kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        sample(tissue, None, **kw)


def test_zero_patches_is_an_empty_list(tissue, lesions) -> None:
    assert sample(tissue, lesions, n=0) == []

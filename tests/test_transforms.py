"""Tests of lymphnode.data.transforms: D4 + colour jitter + HED pipelines and normalisation."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from skimage.color import rgb2hed

from lymphnode.core.errors import ConfigError
from lymphnode.data.transforms import (
    HEDJitter,
    PreprocessStep,
    build_eval_transform,
    build_train_transform,
    hed_perturb,
    to_sample,
)
from lymphnode.models.preprocess import DEFAULT_MEAN, DEFAULT_STD, Preprocess, normalize_stats

P = 16
PRE = Preprocess(level=0, patch_size=P)  # the default contract: 0.5 / 0.5, no stain


def pre(mean=DEFAULT_MEAN, std=DEFAULT_STD) -> Preprocess:
    return Preprocess(level=0, patch_size=P, mean=tuple(mean), std=tuple(std))


def _asymmetric() -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel marks exactly the mask's pixels; no symmetry of the square maps
    the mask (an L in one corner plus a dot) onto itself."""
    mask = np.zeros((P, P), np.uint8)
    mask[1:6, 2] = 1
    mask[5, 2:5] = 1
    mask[10, 12] = 1
    image = np.full((P, P, 3), 40, np.uint8)
    image[..., 1] = np.arange(P, dtype=np.uint8)[:, None] * 8  # a gradient, also asymmetric
    image[..., 0] = mask * 250
    return image, mask


def _he_like(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    conc = rng.uniform(0.0, 1.0, (size, size, 2)) * (rng.random((size, size, 1)) > 0.3)
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    od = conc @ (stains / np.linalg.norm(stains, axis=1, keepdims=True))
    return np.clip(255 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)


def _denormalize(tensor: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(DEFAULT_STD)[:, None, None]
    return ((tensor * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_d4_moves_mask_with_image_and_reaches_all_eight_outcomes() -> None:
    image, mask = _asymmetric()
    pipeline = build_train_transform(PRE, d4=True, color_jitter=None, seed=3)
    outcomes = set()
    for _ in range(200):
        out_image, out_mask = to_sample(pipeline, image, mask)
        restored = _denormalize(out_image)
        marked = (restored[..., 0] > 128).astype(np.uint8)
        np.testing.assert_array_equal(marked, out_mask[0].numpy().astype(np.uint8))
        outcomes.add(out_mask.numpy().tobytes())
    assert len(outcomes) == 8


def test_d4_outcomes_are_the_dihedral_group_of_the_square() -> None:
    _, mask = _asymmetric()
    group = set()
    for k in range(4):
        rotated = np.rot90(mask, k)
        group.add(np.ascontiguousarray(rotated).tobytes())
        group.add(np.ascontiguousarray(rotated.T).tobytes())
    pipeline = build_train_transform(PRE, d4=True, color_jitter=None, seed=0)
    seen = {
        to_sample(pipeline, *_asymmetric())[1][0].numpy().astype(np.uint8).tobytes()
        for _ in range(100)
    }
    assert seen == group


def test_eval_transform_is_deterministic_identity_plus_normalisation() -> None:
    image, mask = _asymmetric()
    pipeline = build_eval_transform(pre([0.1, 0.2, 0.3], [0.5, 0.25, 1.0]))
    first, first_mask = to_sample(pipeline, image, mask)
    again, _ = to_sample(pipeline, image, mask)
    expected = (
        torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        - torch.tensor([0.1, 0.2, 0.3])[:, None, None]
    ) / torch.tensor([0.5, 0.25, 1.0])[:, None, None]
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    assert torch.equal(first, again)
    assert torch.equal(first_mask[0], torch.from_numpy(mask).float())


def test_sample_shapes_and_types() -> None:
    image = _he_like(size=P)
    mask = np.zeros((P, P), np.uint8)
    mask[:4] = 1
    tensor, out_mask = to_sample(build_train_transform(PRE, hed=True, seed=0), image, mask)
    assert tensor.shape == (3, P, P) and tensor.dtype == torch.float32
    assert out_mask.shape == (1, P, P) and out_mask.dtype == torch.float32
    assert set(out_mask.unique().tolist()) == {0.0, 1.0}
    unlabeled, none = to_sample(build_train_transform(PRE, seed=0), image, None)
    assert unlabeled.shape == (3, P, P) and none is None


def test_no_transform_gives_unnormalised_unit_range() -> None:
    image, mask = _asymmetric()
    tensor, out_mask = to_sample(None, image, mask)
    assert float(tensor.max()) <= 1.0 and float(tensor.min()) >= 0.0
    assert torch.equal(out_mask[0], torch.from_numpy(mask).float())


def test_color_jitter_changes_the_image_but_not_the_mask() -> None:
    image = _he_like(seed=1, size=P)
    _, mask = _asymmetric()
    pipeline = build_train_transform(PRE, d4=False, color_jitter=True, seed=0)
    eval_image, _ = to_sample(build_eval_transform(PRE), image, mask)
    changed = 0
    for _ in range(10):
        out, out_mask = to_sample(pipeline, image, mask)
        changed += not torch.allclose(out, eval_image)
        assert torch.equal(out_mask[0], torch.from_numpy(mask).float())
    assert changed >= 9


def test_color_jitter_uses_liu_defaults_with_brightness_as_factor_range() -> None:
    pipeline = build_train_transform(PRE, seed=0)
    jitter = next(t for t in pipeline.transforms if isinstance(t, A.ColorJitter))
    assert jitter.brightness == pytest.approx((1 - 64 / 255, 1 + 64 / 255))
    assert jitter.contrast == pytest.approx((0.25, 1.75))
    assert jitter.saturation == pytest.approx((0.75, 1.25))
    assert jitter.hue == pytest.approx((-0.04, 0.04))
    # brightness alone: a white pixel moves by at most 64 grey levels
    only = build_train_transform(
        pre([0, 0, 0], [1 / 255] * 3),
        d4=False,
        color_jitter={"contrast": 0, "saturation": 0, "hue": 0},
        seed=1,
    )
    white = np.full((4, 4, 3), 255, np.uint8)
    values = [float(to_sample(only, white, None)[0].mean()) for _ in range(200)]
    assert 255 - 64 - 1 <= min(values) < 255 - 40


def test_same_seed_same_augmentations_different_seed_different() -> None:
    image = _he_like(seed=2, size=P)

    def run(seed: int) -> list[torch.Tensor]:
        pipeline = build_train_transform(PRE, hed=True, seed=seed)
        return [to_sample(pipeline, image, None)[0] for _ in range(5)]

    assert all(torch.equal(a, b) for a, b in zip(run(7), run(7)))
    assert not all(torch.equal(a, b) for a, b in zip(run(7), run(8)))


def test_hed_identity_parameters_return_the_input() -> None:
    image = _he_like(seed=3)
    out = hed_perturb(image, [1, 1, 1], [0, 0, 0])
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.abs(out.astype(int) - image).max() <= 1


def test_hed_haematoxylin_offset_raises_skimage_haematoxylin() -> None:
    image = _he_like(seed=4)
    more = hed_perturb(image, [1, 1, 1], [0.1, 0, 0])
    less = hed_perturb(image, [1, 1, 1], [-0.1, 0, 0])
    h = [float(rgb2hed(x)[..., 0].mean()) for x in (less, image, more)]
    assert h[0] < h[1] < h[2]
    eosin = [float(rgb2hed(x)[..., 1].mean()) for x in (less, more)]
    assert abs(eosin[1] - eosin[0]) < 0.2 * (h[2] - h[0])


def test_hed_jitter_keeps_uint8_shape_and_mask() -> None:
    image = np.ascontiguousarray(_he_like(seed=5, size=48)[:, :40])  # non-square
    _, mask = _asymmetric()
    mask = np.zeros((48, 40), np.uint8)
    mask[3:9, 5] = 1
    pipeline = A.Compose([HEDJitter(sigma=0.05, bias=0.05, p=1.0)], seed=0)
    out = pipeline(image=image, mask=mask)
    assert out["image"].dtype == np.uint8 and out["image"].shape == image.shape
    assert not np.array_equal(out["image"], image)
    assert np.array_equal(out["mask"], mask)
    white = np.full((8, 8, 3), 255, np.uint8)
    assert not np.isnan(pipeline(image=white)["image"]).any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"color_jitter": {"brigthness": 0.1}},
            r"color_jitter has unknown key\(s\) \['brigthness'\]",
        ),
        ({"color_jitter": {"hue": 0.7}}, r"color_jitter.hue=0.7 is invalid"),
        ({"color_jitter": {"contrast": -1}}, r"color_jitter.contrast=-1.0 is invalid"),
        ({"color_jitter": "strong"}, r"color_jitter='strong' is invalid"),
        ({"hed": {"sigma": 1.5}}, r"hed.sigma=1.5 is invalid"),
        ({"hed": {"bias": -0.1}}, r"hed.bias=-0.1 is invalid"),
        ({"hed": {"bias": "x"}}, r"hed.bias='x' is invalid"),
    ],
)
def test_bad_augmentation_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_train_transform(PRE, **kwargs)


@pytest.mark.parametrize(
    ("normalize", "match"),
    [
        ({"mean": [123.7, 116.3, 103.5], "std": [58, 57, 57]}, r"normalize.mean=.* 0..1"),
        ({"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}, r"normalize.mean=\[0.5, 0.5\] is invalid"),
        ({"mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, r"normalize.std=.* > 0"),
        ({"mean": [0.5] * 3}, r"exactly the keys 'mean' and 'std'"),
    ],
)
def test_bad_normalisation_raises(normalize: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        normalize_stats(normalize)
    if set(normalize) == {"mean", "std"}:
        with pytest.raises(ConfigError, match=match):
            Preprocess(level=0, patch_size=P, mean=normalize["mean"], std=normalize["std"])


def test_normalize_stats_default_and_plain_lists() -> None:
    assert normalize_stats(None) == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    stats = normalize_stats({"mean": (0.7, 0.5, 0.6), "std": (0.2, 0.2, 0.2)})
    assert stats == {"mean": [0.7, 0.5, 0.6], "std": [0.2, 0.2, 0.2]}


def test_normalised_tensor_matches_albumentations_normalize_and_is_contiguous() -> None:
    image = np.ascontiguousarray(_he_like(seed=6, size=P)[::-1])  # also from a flipped view
    stats = {"mean": [0.7, 0.6, 0.75], "std": [0.15, 0.2, 0.1]}
    reference = A.Compose(
        [A.Normalize(mean=stats["mean"], std=stats["std"], max_pixel_value=255.0), A.ToTensorV2()]
    )(image=image)["image"]
    ours, _ = to_sample(build_eval_transform(pre(**stats)), image, None)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert ours.is_contiguous()
    view, _ = to_sample(build_eval_transform(pre(**stats)), image[::-1], None)
    torch.testing.assert_close(view, reference.flip(1), rtol=0, atol=1e-5)


def test_random_crop_trains_on_crops_and_eval_uses_the_centre_crop() -> None:
    image = np.zeros((P, P, 3), np.uint8)
    image[..., 0] = np.arange(P, dtype=np.uint8)[None, :] * 10  # red = column x 10
    image[..., 1] = np.arange(P, dtype=np.uint8)[:, None] * 10  # green = row x 10
    mask = (image[..., 0] > 70).astype(np.uint8)
    train = build_train_transform(PRE, d4=False, color_jitter=None, crop=8, seed=0)
    corners = set()
    for _ in range(50):
        out, out_mask = to_sample(train, image, mask)
        assert out.shape == (3, 8, 8) and out_mask.shape == (1, 8, 8)
        restored = _denormalize(out)
        np.testing.assert_array_equal((restored[..., 0] > 70).astype(np.uint8), out_mask[0].numpy())
        corners.add((int(restored[0, 0, 1]) // 10, int(restored[0, 0, 0]) // 10))
    assert len(corners) > 5  # random positions
    centre, centre_mask = to_sample(build_eval_transform(PRE, crop=8), image, mask)
    assert centre.shape == (3, 8, 8)
    np.testing.assert_array_equal(_denormalize(centre), image[4:12, 4:12])
    np.testing.assert_array_equal(centre_mask[0].numpy(), mask[4:12, 4:12])


@pytest.mark.parametrize("crop", [0, -3, 2.5, True, "big"])
def test_bad_crop_raises(crop: object) -> None:
    message = rf"^transforms.crop must be an integer >= 1 px \(or null\), got {crop!r}$"
    with pytest.raises(ConfigError, match=message):
        build_train_transform(PRE, crop=crop)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        build_eval_transform(PRE, crop=crop)  # type: ignore[arg-type]


def test_eval_pipeline_is_the_contracts_apply() -> None:
    stain = {
        "method": "reinhard",
        "options": {},
        "mean": [55.0, 25.0, -15.0],
        "std": [12.0, 6.0, 5.0],
    }
    contract = Preprocess(
        level=0, patch_size=64, mean=(0.6, 0.5, 0.7), std=(0.2, 0.3, 0.25), stain=stain
    )
    image = _he_like(seed=3)
    ours, _ = to_sample(build_eval_transform(contract), image, None)
    assert torch.equal(ours, contract.apply(image))
    assert not torch.equal(
        ours, pre((0.6, 0.5, 0.7), (0.2, 0.3, 0.25)).apply(image)
    )  # stain counts
    with pytest.raises(ConfigError, match=r"step='both' is invalid"):
        PreprocessStep(contract, "both")

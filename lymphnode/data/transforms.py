"""Patch augmentations and normalisation (albumentations 2.x pipelines).

Training: the 8 dihedral transforms of the square (``A.D4``, image and mask together) + colour jitter
with the defaults of Liu et al. 2017 ("Detecting cancer metastases on gigapixel pathology images")
+ optional HED stain augmentation (Tellez et al. 2018), optionally on a random crop
(``crop``). Validation and test: no augmentation (a centre crop with ``crop``). Every pipeline
runs the preprocessing contract (:class:`lymphnode.models.Preprocess`): its stain normalisation
before the augmentations and its normalisation ``(img / 255 - mean) / std`` into a tensor at the
end (validation/test: :meth:`Preprocess.apply`, exactly what ``infer`` feeds the network), so a
pipeline maps ``image (H, W, 3) uint8 RGB, mask (H, W) uint8 {0, 1}`` to ``image (3, H, W) float32
tensor, mask (H, W) uint8 array`` (:func:`to_sample` makes the mask a (1, H, W) float32 tensor).

Colour jitter units (Liu et al. used TensorFlow's ``random_brightness/contrast/saturation/hue``):

- ``brightness`` is Liu et al.'s *additive* maximum delta on intensities in 0..1 (64/255).
  ``A.ColorJitter`` multiplies by a factor instead, so ``b`` becomes the factor range
  ``(1 - b, 1 + b)``: a white pixel (255) moves by at most ±64 grey levels, as in the paper, and a
  darker pixel by proportionally less (tissue at ~180 moves by at most ±45).
- ``contrast`` and ``saturation`` are factor half-widths: ``c`` means a factor in
  ``(max(0, 1 - c), 1 + c)``, the same as TensorFlow's ``lower=1-c, upper=1+c``.
- ``hue`` is a shift in fractions of the hue circle, ``U(-h, h)``, the same in both libraries.

Importing this module imports :mod:`lymphnode` first so that albumentations never checks PyPI.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed

import lymphnode  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations is used)
from lymphnode.core import validate
from lymphnode.core.errors import ConfigError
from lymphnode.data.stain_transfer import RandStainNA
from lymphnode.models.preprocess import Preprocess
from lymphnode.models.stain import OD_LUT

log = logging.getLogger(__name__)

# Liu et al. 2017, Sec. 3 ("color perturbation"): brightness delta 64/255, saturation 0.25,
# hue 0.04, contrast 0.75.
DEFAULT_COLOR_JITTER: dict[str, float] = {
    "brightness": 64 / 255,
    "contrast": 0.75,
    "saturation": 0.25,
    "hue": 0.04,
    "p": 1.0,
}
# Tellez et al. 2018 used 0.05 ("HED-light"); 0.03 is a milder default (see HEDJitter for units).
DEFAULT_HED: dict[str, float] = {"sigma": 0.03, "bias": 0.03, "p": 1.0}
# Gaussian blur (SimCLR's views): sigma in px of the patch's level, applied with probability p.
DEFAULT_BLUR: dict[str, float] = {"sigma_min": 0.1, "sigma_max": 2.0, "p": 0.5}
# Greyscale (SimCLR's views): luminance copied to the 3 channels with probability p.
DEFAULT_GRAYSCALE: dict[str, float] = {"p": 0.2}


def hed_perturb(
    image: np.ndarray, alpha: Sequence[float] | np.ndarray, beta: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Rescale and shift the haematoxylin, eosin and DAB channels of an RGB uint8 image.

    Colour deconvolution with scikit-image's Ruifrok-Johnston matrices (``hed_from_rgb``,
    ``rgb_from_hed``): ``hed = OD @ hed_from_rgb`` with ``OD = -ln(I / 255)`` per pixel, then
    ``hed' = alpha * hed + beta`` per channel, then back to RGB. The three steps are linear in OD, so
    they run as one 3x3 matrix plus offset per pixel (``cv2.transform``). ``beta`` is in natural-log
    optical-density units. Unlike ``skimage.color.rgb2hed`` the stain concentrations are not clipped
    at 0 and not divided by ``ln(1e6)``, so ``alpha = 1, beta = 0`` returns the input unchanged.

    Args:
        image: (H, W, 3) uint8 RGB.
        alpha: 3 multiplicative factors (H, E, D).
        beta: 3 additive offsets (H, E, D) in optical-density units.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    alpha_arr = np.asarray(alpha, dtype=np.float64)
    beta_arr = np.asarray(beta, dtype=np.float64)
    # row-vector convention: od' = od @ M + c. cv2.transform computes m[:, :3] @ src + m[:, 3]
    # per pixel, so it yields ln(255) - od' = ln(I') directly; exp, then round and saturate.
    matrix = hed_from_rgb @ np.diag(alpha_arr) @ rgb_from_hed
    offset = beta_arr @ rgb_from_hed
    affine = np.concatenate([-matrix.T, np.log(255.0) - offset[:, None]], axis=1)
    log_rgb = cv2.transform(cv2.LUT(image, OD_LUT), affine.astype(np.float32))
    return cv2.convertScaleAbs(np.exp(log_rgb, out=log_rgb))


class HEDJitter(A.ImageOnlyTransform):
    """HED stain augmentation (Tellez et al. 2018): perturb each stain channel independently.

    For each image, ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-bias, bias)`` are drawn per
    channel (H, E, D) and applied by :func:`hed_perturb` (``beta`` in optical-density units,
    ``-ln(I/255)``; typical tissue has H/E densities 0.1-1). Passing the same numbers to
    scikit-image's ``rgb2hed``/``hed2rgb``, which divide densities by ``ln(1e6) ≈ 13.8``, would be
    13.8x stronger in ``bias``. About 0.3 ms per 304² patch on one core (see
    experiments/benchmarks/README_data.md).

    Args:
        sigma: half-width of the multiplicative factor range, in [0, 1).
        bias: half-width of the additive offset range, >= 0 (optical density).
        p: probability of applying the transform.
    """

    def __init__(self, sigma: float = 0.03, bias: float = 0.03, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not (isinstance(sigma, (int, float)) and 0.0 <= sigma < 1.0):
            raise ConfigError(f"hed.sigma={sigma!r} is invalid: expected a number in [0, 1)")
        if not (isinstance(bias, (int, float)) and bias >= 0.0 and math.isfinite(bias)):
            raise ConfigError(f"hed.bias={bias!r} is invalid: expected a finite number >= 0")
        self.sigma = float(sigma)
        self.bias = float(bias)

    def get_params(self) -> dict[str, Any]:
        """Draw ``alpha`` (3,) and ``beta`` (3,) from this transform's seeded generator."""
        alpha = self.random_generator.uniform(1.0 - self.sigma, 1.0 + self.sigma, size=3)
        beta = self.random_generator.uniform(-self.bias, self.bias, size=3)
        return {"alpha": alpha, "beta": beta}

    def apply(
        self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any
    ) -> np.ndarray:
        """Perturb one (H, W, 3) uint8 RGB image."""
        return hed_perturb(img, alpha, beta)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments that albumentations serialises (``A.to_dict``)."""
        return ("sigma", "bias")


def _merge_options(
    name: str, options: Mapping[str, Any] | bool | None, defaults: Mapping[str, float]
) -> dict[str, float] | None:
    """None/False -> off; True or {} -> defaults; a mapping overrides defaults key by key."""
    if options is None or options is False:
        return None
    if options is True:
        return dict(defaults)
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"{name}={options!r} is invalid: expected null, true or a mapping with keys "
            f"{sorted(defaults)}"
        )
    validate.keys(name, options, sorted(defaults))
    merged = dict(defaults)
    for key, value in options.items():
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{name}.{key}={value!r} is invalid: expected a finite number")
        merged[key] = float(value)
    return merged


def _color_jitter(options: dict[str, float]) -> A.ColorJitter:
    for key in ("brightness", "contrast", "saturation"):
        if options[key] < 0:
            raise ConfigError(f"color_jitter.{key}={options[key]} is invalid: expected >= 0")
    if not 0.0 <= options["hue"] <= 0.5:
        raise ConfigError(f"color_jitter.hue={options['hue']} is invalid: expected in [0, 0.5]")
    if not 0.0 <= options["p"] <= 1.0:
        raise ConfigError(f"color_jitter.p={options['p']} is invalid: expected in [0, 1]")
    return A.ColorJitter(
        brightness=(max(0.0, 1.0 - options["brightness"]), 1.0 + options["brightness"]),
        contrast=(max(0.0, 1.0 - options["contrast"]), 1.0 + options["contrast"]),
        saturation=(max(0.0, 1.0 - options["saturation"]), 1.0 + options["saturation"]),
        hue=(-options["hue"], options["hue"]),
        p=options["p"],
    )


class PreprocessStep(A.ImageOnlyTransform):
    """One step of the preprocessing contract (:class:`lymphnode.models.Preprocess`) inside an
    albumentations pipeline, so that augmentations run between its two steps.

    Args:
        preprocess: the contract.
        step: ``"stain"`` (:meth:`Preprocess.stain_normalize`, uint8 -> uint8), ``"normalize"``
            (:meth:`Preprocess.normalize`, uint8 (H, W, 3) -> float32 tensor (3, H, W)) or
            ``"apply"`` (both: what validation, test and ``infer`` feed the network).
    """

    STEPS = ("stain", "normalize", "apply")

    def __init__(self, preprocess: Preprocess, step: str) -> None:
        super().__init__(p=1.0)
        if step not in self.STEPS:
            raise ConfigError(f"PreprocessStep step={step!r} is invalid: expected {self.STEPS}")
        self.preprocess = preprocess
        self.step = step

    def apply(self, img: np.ndarray, **params: Any) -> Any:
        """Run the step on one (H, W, 3) uint8 RGB image."""
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ConfigError(
                f"image has shape {img.shape} and dtype {img.dtype}: expected (H, W, 3) uint8 RGB"
            )
        if self.step == "stain":
            return self.preprocess.stain_normalize(img)
        if self.step == "normalize":
            return self.preprocess.normalize(np.ascontiguousarray(img))
        return self.preprocess.apply(img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments that albumentations serialises (``A.to_dict``)."""
        return ("step",)


def _check_crop(crop: Any) -> int | None:
    if crop is None:
        return None
    return validate.integer("transforms.crop", crop, 1, unit="px (or null)")


def build_train_transform(
    preprocess: Preprocess,
    *,
    d4: bool = True,
    color_jitter: Mapping[str, float] | bool | None = True,
    hed: Mapping[str, float] | bool | None = None,
    crop: int | None = None,
    blur: Mapping[str, float] | bool | None = None,
    grayscale: Mapping[str, float] | bool | None = None,
    randstain: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> A.Compose:
    """The training pipeline: [random crop] -> stain norm -> [RandStainNA] -> D4 -> [colour
    jitter] -> [HED] -> [blur] -> [greyscale] -> normalise -> tensor (the contract's two steps
    around the augmentations).

    Args:
        preprocess: the preprocessing contract (stain state, normalisation).
        d4: apply one of the 8 dihedral transforms (uniformly; identity included) to image and mask.
        color_jitter: True/{} for Liu et al.'s defaults (:data:`DEFAULT_COLOR_JITTER`), a mapping
            overriding some of ``brightness, contrast, saturation, hue, p`` (units in the module
            docstring), or None/False for none.
        hed: None/False (default) for none, True/{} for :data:`DEFAULT_HED`, or a mapping overriding
            ``sigma, bias, p`` (:class:`HEDJitter`).
        crop: side in px of a random crop (image and mask together) taken first, or None for the
            whole patch; it must not exceed the cached patch side.
        blur: None/False (default) for none, True/{} for :data:`DEFAULT_BLUR` (Gaussian, sigma
            ``sigma_min..sigma_max`` px, probability ``p``), or a mapping overriding those keys.
        grayscale: None/False (default) for none, True/{} for :data:`DEFAULT_GRAYSCALE`, or
            ``{p}``: the image becomes its luminance in all 3 channels with probability p.
        randstain: None (default) for none, or the arguments of
            :class:`lymphnode.data.stain_transfer.RandStainNA` (``distribution`` fitted from an
            unlabeled pool, ``spread``, ``p``): a random stain per image from the pool's
            distribution (the DataModule fits it from ``transforms.randstain.cache``).
        seed: seed of the pipeline's random generator (None: fresh entropy). DataLoader workers
            reseed their copy (see :class:`lymphnode.data.datasets.CacheDataset`).

    Returns:
        ``A.Compose``; call it as ``pipeline(image=img, mask=mask)``.
    """
    crop = _check_crop(crop)
    steps: list[A.BasicTransform] = []
    if crop is not None:
        steps.append(A.RandomCrop(crop, crop, p=1.0))
    if preprocess.stain is not None:
        steps.append(PreprocessStep(preprocess, "stain"))
    if randstain is not None:
        steps.append(RandStainNA(**randstain))
    if d4:
        steps.append(A.D4(p=1.0))
    jitter = _merge_options("color_jitter", color_jitter, DEFAULT_COLOR_JITTER)
    if jitter is not None:
        steps.append(_color_jitter(jitter))
    hed_options = _merge_options("hed", hed, DEFAULT_HED)
    if hed_options is not None:
        steps.append(HEDJitter(**hed_options))
    blur_options = _merge_options("blur", blur, DEFAULT_BLUR)
    if blur_options is not None:
        low, high, p = blur_options["sigma_min"], blur_options["sigma_max"], blur_options["p"]
        if not (0.0 < low <= high) or not 0.0 <= p <= 1.0:
            raise ConfigError(
                f"blur={blur_options} is invalid: expected 0 < sigma_min <= sigma_max (px) and p "
                "in [0, 1]"
            )
        steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=(low, high), p=p))
    gray_options = _merge_options("grayscale", grayscale, DEFAULT_GRAYSCALE)
    if gray_options is not None:
        if not 0.0 <= gray_options["p"] <= 1.0:
            raise ConfigError(f"grayscale.p={gray_options['p']} is invalid: expected in [0, 1]")
        steps.append(A.ToGray(num_output_channels=3, p=gray_options["p"]))
    pipeline = A.Compose([*steps, PreprocessStep(preprocess, "normalize")])
    seed_pipeline(pipeline, seed)
    return pipeline


def seed_pipeline(pipeline: A.Compose, seed: int | None) -> None:
    """Give every transform of ``pipeline`` one shared generator seeded with ``seed``.

    ``A.Compose(seed=s)`` seeds each transform's own generator with the same ``s``, so two
    transforms drawing from identical streams are correlated (e.g. the D4 element and the first HED
    factor). Sharing one numpy and one Python generator makes the draws sequential instead.
    """
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def build_eval_transform(preprocess: Preprocess, *, crop: int | None = None) -> A.Compose:
    """The validation/test pipeline: [centre crop] -> :meth:`Preprocess.apply`; deterministic.

    With ``crop`` (the training crop) the network is evaluated on the centre ``crop`` x ``crop``
    px of each patch: the input size it was trained on and that ``infer`` tiles with.
    """
    crop = _check_crop(crop)
    steps: list[A.BasicTransform] = [] if crop is None else [A.CenterCrop(crop, crop, p=1.0)]
    return A.Compose([*steps, PreprocessStep(preprocess, "apply")], seed=0)


def to_sample(
    transform: A.Compose | None, image: np.ndarray, mask: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a pipeline on one patch and return ``image (3, H, W) float32, mask (1, H, W) float32``.

    ``transform=None`` only converts: image / 255 in 0..1, no normalisation.
    """
    if transform is None:
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
        out_mask = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))
    else:
        out = transform(image=image) if mask is None else transform(image=image, mask=mask)
        tensor = out["image"]
        out_mask = out.get("mask") if mask is not None else None
        if isinstance(out_mask, np.ndarray):
            out_mask = torch.from_numpy(np.ascontiguousarray(out_mask))
    if out_mask is not None:
        out_mask = out_mask.reshape(1, *out_mask.shape[-2:]).float()
    return tensor, out_mask


__all__ = [
    "DEFAULT_BLUR",
    "DEFAULT_COLOR_JITTER",
    "DEFAULT_GRAYSCALE",
    "DEFAULT_HED",
    "HEDJitter",
    "PreprocessStep",
    "build_eval_transform",
    "build_train_transform",
    "hed_perturb",
    "seed_pipeline",
    "to_sample",
]

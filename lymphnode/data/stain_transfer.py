"""Stain transfer to another centre's colours: re-staining test patches and RandStainNA training.

A model trained on one hospital's slides meets other stains and scanners. Two uses of the same
idea, both built on the normalisers of :mod:`lymphnode.models.stain`:

- :class:`StainBank`: the stain of each image of a set (one CAMELYON17 centre's crops), one
  fitted normaliser state per image. :meth:`StainBank.restain` gives a patch the stain of one of
  those images: with ``method="macenko"`` its two stain vectors and concentration maxima (a
  stain-matrix transfer: the patch's own H and E concentrations recomposed with the target's
  vectors), with ``method="reinhard"`` its CIELAB tissue mean and standard deviation (a statistics
  transfer). Sampling one bank image per patch (seeded, :meth:`StainBank.index_for`) keeps the
  within-centre spread of the stain, not only its mean. ``experiments/real_dev/cross_centre.py``
  uses it to build test sets that carry other centres' stains.
- :class:`RandStainNA` (Shen et al. 2022, "RandStainNA: learning stain-agnostic features"): an
  albumentations transform that gives every training image a *random* stain drawn from the
  distribution of the unlabeled pool's per-image CIELAB statistics (a normal distribution per
  statistic, fitted with :func:`fit_lab_distribution`), applied as a Reinhard transfer. The pool
  holds the centres the user has unlabeled tissue from, so the labelled patches are seen in those
  centres' colours.

Units: CIELAB L in 0..100, a and b in about -128..127 (OpenCV's float CIELAB, D65); statistics over
tissue pixels only (L below ``tissue_lightness``, 90). Stain vectors are unit optical-density
vectors (OD = -ln(I / 255)), rows haematoxylin then eosin.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np

from lymphnode.core.errors import ConfigError
from lymphnode.models.stain import (
    METHODS,
    OD_LUT,
    ReinhardNormalizer,
    build_stain_normalizer,
    stain_normalizer_from_state,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ re-staining
class StainBank:
    """Per-image stain states of a set of images, to give other images their stains.

    Build it with :meth:`fit`; images whose stain cannot be estimated (too little tissue, one
    colour) are left out and counted in :attr:`skipped`.

    Args:
        method: ``"macenko"`` (stain-matrix transfer) or ``"reinhard"`` (CIELAB statistics).
        states: one :meth:`MacenkoNormalizer.state` / :meth:`ReinhardNormalizer.state` per image.
        names: the images' names (same order), for reports.
        skipped: how many images of the set gave no state.
    """

    def __init__(
        self,
        method: str,
        states: Sequence[Mapping[str, Any]],
        names: Sequence[str] | None = None,
        skipped: int = 0,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"stain transfer method={method!r} is invalid: expected {METHODS}")
        if not states:
            raise ConfigError(
                f"stain bank ({method}) has no image with an estimable stain: expected at least "
                "one H&E image with enough tissue"
            )
        self.method = method
        self.states = [dict(s) for s in states]
        self.names = list(names) if names is not None else [str(i) for i in range(len(states))]
        if len(self.names) != len(self.states):
            raise ConfigError(f"{len(self.names)} names for {len(self.states)} stain states")
        self.skipped = int(skipped)
        self._normalizers = [stain_normalizer_from_state(s) for s in self.states]

    @classmethod
    def fit(
        cls,
        images: Sequence[np.ndarray],
        method: str,
        names: Sequence[str] | None = None,
        *,
        pool_intensity: bool = True,
        **options: Any,
    ) -> StainBank:
        """Fit one normaliser per image ((H, W, 3) uint8 RGB each); ``options`` go to the
        normaliser (:func:`lymphnode.models.stain.build_stain_normalizer`).

        ``pool_intensity``: replace each image's intensity statistics — Macenko's concentration
        maxima, Reinhard's L mean and std — by their median over the set, keeping each image's
        chroma (stain vectors; a/b statistics). Per-image intensity mostly reflects what the
        crop shows (a field of lymphocytes is darker than a tumour nest), not the centre's stain,
        and would darken or lighten a patch with another tissue's content.
        """
        names = list(names) if names is not None else [str(i) for i in range(len(images))]
        states: list[dict[str, Any]] = []
        kept: list[str] = []
        quiet = logging.getLogger("lymphnode.models.stain")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # the normalisers log every fit: one line per image
        try:
            for name, image in zip(names, images, strict=True):
                try:
                    states.append(build_stain_normalizer(method, **options).fit(image).state())
                except ConfigError:  # no tissue / one colour: not a stain sample
                    continue
                kept.append(name)
        finally:
            quiet.setLevel(level)
        skipped = len(names) - len(kept)
        if pool_intensity and states:
            _pool_intensity(states)
        if skipped:
            log.info("stain bank (%s): %d of %d images without a usable stain", method, skipped,
                     len(names))  # fmt: skip
        return cls(method, states, kept, skipped)

    def __len__(self) -> int:
        return len(self.states)

    def index_for(self, key: int, seed: int = 0) -> int:
        """The bank image whose stain patch ``key`` gets: uniform, seeded by (seed, key) only, so
        a patch keeps its target whatever else is re-stained."""
        return int(np.random.default_rng([seed, key]).integers(len(self.states)))

    def restain(
        self, image: np.ndarray, index: int, source: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """``image`` ((H, W, 3) uint8 RGB) with the stain of bank image ``index``.

        ``source``: the stain ``image`` is taken to have (a :meth:`fit` state of the set it comes
        from, e.g. all test patches of one slide or centre): every image of that set then gets
        the same colour map, so differences between them (a dark lymphocyte field, a pale
        tumour nest) survive, as they do between two slides of one centre. None: the image's own
        stain, estimated from it alone, as a stain normaliser does (this maps every patch to the
        same statistics and erases such differences); unchanged where the normaliser leaves it
        (too little tissue)."""
        if source is None:
            return self._normalizers[index].transform(image)
        return transfer(image, source, self.states[index])

    def summary(self) -> dict[str, Any]:
        """Mean and spread of the bank's stains as plain JSON (for reports)."""
        out: dict[str, Any] = {"method": self.method, "images": len(self), "skipped": self.skipped}
        if self.method == "macenko":
            matrices = np.array([s["stain_matrix"] for s in self.states])  # (N, 2, 3)
            maxima = np.array([s["max_concentrations"] for s in self.states])  # (N, 2)
            out["stain_matrix_mean"] = np.round(matrices.mean(0), 4).tolist()
            out["max_concentrations_mean"] = np.round(maxima.mean(0), 4).tolist()
        else:
            means = np.array([s["mean"] for s in self.states])
            stds = np.array([s["std"] for s in self.states])
            out["lab_mean"] = np.round(means.mean(0), 3).tolist()
            out["lab_mean_sd"] = np.round(means.std(0), 3).tolist()
            out["lab_std_mean"] = np.round(stds.mean(0), 3).tolist()
        return out


def fit_source(images: Sequence[np.ndarray], method: str, **options: Any) -> dict[str, Any]:
    """The stain of a set of images, pooled (one normaliser fitted on all of them): the
    ``source`` of :meth:`StainBank.restain`."""
    quiet = logging.getLogger("lymphnode.models.stain")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return build_stain_normalizer(method, **options).fit(list(images)).state()
    finally:
        quiet.setLevel(level)


def transfer(image: np.ndarray, source: Mapping[str, Any], target: Mapping[str, Any]) -> np.ndarray:
    """One fixed colour map from the ``source`` stain to the ``target`` stain, applied to
    ``image`` ((H, W, 3) uint8 RGB); both are normaliser states of one method.

    - Macenko: stain concentrations ``C = OD @ pinv(M_source)``, rescaled by
      ``max_target / max_source`` per stain, recomposed ``OD' = C' @ M_target``.
    - Reinhard: ``lab' = (lab - mean_source) / std_source * std_target + mean_target`` per
      CIELAB channel (L 0..100, a/b about -128..127).
    """
    if source.get("method") != target.get("method"):
        raise ConfigError(
            f"stain transfer from a {source.get('method')!r} to a {target.get('method')!r} "
            "state: expected one method"
        )
    if source["method"] == "macenko":
        m_src = np.asarray(source["stain_matrix"], np.float64)
        m_tgt = np.asarray(target["stain_matrix"], np.float64)
        scale = np.asarray(target["max_concentrations"]) / np.maximum(
            np.asarray(source["max_concentrations"]), 1e-6
        )
        recompose = (np.linalg.pinv(m_src) * scale) @ m_tgt  # (3, 3): od row -> od' row
        affine = np.concatenate([-recompose.T, np.full((3, 1), np.log(255.0))], axis=1)
        log_rgb = cv2.transform(cv2.LUT(image, OD_LUT), affine.astype(np.float32))
        return cv2.convertScaleAbs(np.exp(log_rgb, out=log_rgb))
    mean_s, std_s = np.asarray(source["mean"]), np.asarray(source["std"])
    mean_t, std_t = np.asarray(target["mean"]), np.asarray(target["std"])
    scale = std_t / np.maximum(std_s, 1e-6)
    shift = mean_t - mean_s * scale
    # in OpenCV's 8-bit CIELAB units (L * 255 / 100, a + 128, b + 128)
    k, o = np.array([255.0 / 100.0, 1.0, 1.0]), np.array([0.0, 128.0, 128.0])
    shift8 = shift * k + o * (1.0 - scale)
    affine = np.concatenate([np.diag(scale), shift8[:, None]], axis=1).astype(np.float32)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    out = np.clip(cv2.transform(lab, affine) + 0.5, 0.0, 255.0).astype(np.uint8)
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB)


def _pool_intensity(states: list[dict[str, Any]]) -> None:
    """Set every state's intensity statistics to the median over ``states`` (in place)."""
    if states[0]["method"] == "macenko":
        maxima = np.median([s["max_concentrations"] for s in states], axis=0).tolist()
        for s in states:
            s["max_concentrations"] = maxima
    else:
        lightness = np.median([[s["mean"][0], s["std"][0]] for s in states], axis=0)
        for s in states:
            s["mean"] = [float(lightness[0]), *s["mean"][1:]]
            s["std"] = [float(lightness[1]), *s["std"][1:]]


# -------------------------------------------------------------------------------- RandStainNA
@dataclass(frozen=True)
class LabDistribution:
    """Normal distributions of per-image CIELAB tissue statistics: ``mean_mu``/``mean_sd`` (3,)
    of the images' L, a, b means, ``std_mu``/``std_sd`` (3,) of their standard deviations."""

    mean_mu: tuple[float, float, float]
    mean_sd: tuple[float, float, float]
    std_mu: tuple[float, float, float]
    std_sd: tuple[float, float, float]
    n_images: int

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON (recorded with the run's data settings)."""
        return {
            "mean_mu": list(self.mean_mu),
            "mean_sd": list(self.mean_sd),
            "std_mu": list(self.std_mu),
            "std_sd": list(self.std_sd),
            "n_images": self.n_images,
        }


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


def fit_lab_distribution(
    images: Sequence[np.ndarray], *, tissue_lightness: float = 90.0
) -> LabDistribution:
    """Fit :class:`LabDistribution` to the tissue CIELAB means and standard deviations of
    ``images`` ((H, W, 3) uint8 RGB); images without enough tissue are left out.

    Raises:
        ConfigError: fewer than 2 images with tissue (a spread needs two).
    """
    bank = StainBank.fit(
        images, "reinhard", pool_intensity=False, tissue_lightness=tissue_lightness
    )
    if len(bank) < 2:
        raise ConfigError(
            f"RandStainNA needs at least 2 images with tissue to fit a stain distribution: got "
            f"{len(bank)} of {len(images)}"
        )
    means = np.array([s["mean"] for s in bank.states])  # (N, 3)
    stds = np.array([s["std"] for s in bank.states])
    return LabDistribution(
        _triple(means.mean(0)), _triple(means.std(0, ddof=1)),
        _triple(stds.mean(0)), _triple(stds.std(0, ddof=1)), len(bank),
    )  # fmt: skip


class RandStainNA(A.ImageOnlyTransform):
    """Random stain augmentation from a stain distribution (RandStainNA, Shen et al. 2022).

    Per image: draw a target LAB mean ``m ~ N(mean_mu, (spread * mean_sd)^2)`` and standard
    deviation ``s ~ N(std_mu, (spread * std_sd)^2)`` (floored at 1 LAB unit) per channel, then
    Reinhard-transfer the image's tissue statistics to ``(m, s)``. ``spread`` widens (> 1) or
    narrows the distribution of the unlabeled pool.

    Args:
        distribution: :class:`LabDistribution` or its :meth:`~LabDistribution.as_dict`.
        spread: multiple of the fitted standard deviations, >= 0.
        tissue_lightness: L below which a pixel is tissue (statistics of the source image).
        p: probability of applying the transform.
    """

    def __init__(
        self,
        distribution: LabDistribution | Mapping[str, Any],
        spread: float = 1.0,
        tissue_lightness: float = 90.0,
        p: float = 0.8,
    ) -> None:
        super().__init__(p=p)
        if not isinstance(distribution, LabDistribution):
            given = dict(distribution)
            try:
                fields: dict[str, Any] = {
                    k: tuple(v) if isinstance(v, Sequence) else v for k, v in given.items()
                }
                distribution = LabDistribution(**fields)
            except TypeError as exc:
                raise ConfigError(
                    f"randstain distribution {given!r} is invalid ({exc}): expected "
                    "mean_mu, mean_sd, std_mu, std_sd (3 numbers each) and n_images"
                ) from exc
        if not (isinstance(spread, (int, float)) and 0.0 <= spread < 100.0):
            raise ConfigError(f"randstain.spread={spread!r} is invalid: expected a number >= 0")
        self.distribution = distribution
        self.spread = float(spread)
        self.tissue_lightness = float(tissue_lightness)
        self._normalizer = ReinhardNormalizer(tissue_lightness=tissue_lightness)

    def get_params(self) -> dict[str, Any]:
        """Draw the target LAB ``mean`` (3,) and ``std`` (3,) from the seeded generator."""
        d, rng = self.distribution, self.random_generator
        mean = rng.normal(np.array(d.mean_mu), self.spread * np.array(d.mean_sd))
        std = rng.normal(np.array(d.std_mu), self.spread * np.array(d.std_sd))
        return {"mean": mean, "std": np.maximum(std, 1.0)}

    def apply(self, img: np.ndarray, mean: np.ndarray, std: np.ndarray, **params: Any) -> Any:
        """Reinhard-transfer one (H, W, 3) uint8 RGB image to the drawn statistics."""
        self._normalizer.mean, self._normalizer.std = mean, std
        return self._normalizer.transform(img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments that albumentations serialises (``A.to_dict``)."""
        return ("spread", "tissue_lightness")


__all__ = [
    "LabDistribution",
    "RandStainNA",
    "StainBank",
    "fit_lab_distribution",
    "fit_source",
    "transfer",
]

"""How one synthetic slide looks: stain vectors, stain amount, glass tint, blur, noise, JPEG
quality, drawn as if stained and scanned at one CAMELYON centre."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CAMELYON_MPP = 0.243  # µm/px at level 0 of CAMELYON16's 40x scans

# Stain optical densities per unit concentration (R, G, B), Ruifrok & Johnston's H&E vectors.
H_VECTOR = np.array([0.65, 0.70, 0.29])
E_VECTOR = np.array([0.07, 0.99, 0.11])

__all__ = ["CAMELYON_MPP", "E_VECTOR", "H_VECTOR", "SlideStyle"]


@dataclass(frozen=True)
class SlideStyle:
    """How one slide looks, as if stained and scanned at one CAMELYON centre.

    Attributes:
        stain_h, stain_e: optical density (R, G, B) per unit haematoxylin / eosin concentration.
        background_od: optical density (R, G, B) of the glass (a faint tint).
        blur_sigma: scanner blur, Gaussian sigma in level-0 px.
        noise_sigma: sensor noise, standard deviation in RGB units (0..255).
        jpeg_quality: JPEG quality of the pyramid's tiles.
    """

    stain_h: tuple[float, float, float]
    stain_e: tuple[float, float, float]
    background_od: tuple[float, float, float]
    blur_sigma: float
    noise_sigma: float
    jpeg_quality: int

    @classmethod
    def sample(cls, rng: np.random.Generator) -> SlideStyle:
        """A random style; ranges chosen so that slides look like different centres' scans."""

        def vector(base: np.ndarray, strength: float, jitter: float) -> tuple[float, float, float]:
            v = base / np.linalg.norm(base) + rng.normal(0.0, jitter, 3)
            v = np.clip(v, 0.02, None)
            v *= strength / np.linalg.norm(v)
            return float(v[0]), float(v[1]), float(v[2])

        amount = rng.uniform(0.6, 1.45)  # staining strength (section thickness, stain time)
        glass = rng.uniform(0.01, 0.04) + rng.uniform(0.0, 0.025, 3)  # a faint tint
        return cls(
            stain_h=vector(H_VECTOR, amount * rng.uniform(0.8, 1.25), 0.05),
            stain_e=vector(E_VECTOR, amount * rng.uniform(0.6, 1.4), 0.08),
            background_od=(float(glass[0]), float(glass[1]), float(glass[2])),
            blur_sigma=float(rng.uniform(0.4, 1.6)),
            noise_sigma=float(rng.uniform(1.0, 4.0)),
            jpeg_quality=int(rng.integers(75, 96)),
        )

"""How unsure a model is about a tile: the uncertainty scores behind ``python -m lymphnode.select``.

Every score is the mean over the tile's pixels of a per-pixel uncertainty in [0, 1]:

- ``tta``: D4 test-time-augmentation disagreement. The 8 dihedral variants of the tile (4
  rotations × optional flip) are predicted, each prediction is mapped back to the tile's frame, and
  the per-pixel variance of the 8 probabilities is scaled by 4 (the largest variance of values in
  [0, 1] is 1/4: half of them 0, half 1), so 0 = all 8 agree, 1 = an even split of 0s and 1s.
  A model whose prediction commutes with the D4 transforms scores exactly 0.
- ``entropy``: binary entropy in bits, ``-p log2 p - (1-p) log2 (1-p)``, of the plain (un-augmented)
  prediction; 1 at p = 0.5, 0 at p ∈ {0, 1}. One forward pass per tile instead of 8.
- ``tta_entropy``: ``(tta + H(p̄)) / 2`` with ``p̄`` the mean of the 8 D4 predictions: the
  disagreement between views plus the entropy of their consensus, equally weighted (both in
  [0, 1], so is the sum's half). A tile every view calls 0.5 scores 0.5 (entropy, no
  disagreement); a tile the views split 0/1 scores 1.

:func:`tile_scores` batches the forward passes as :func:`lymphnode.inference.predict.run_tiles`
does (DataLoader workers read and stain-normalise tiles, normalisation on the model's device, the
same torch thread settings).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np
import torch

from lymphnode.core import validate
from lymphnode.inference.predict import _d4, _d4_inverse, _torch_settings, model_threads
from lymphnode.inference.settings import InferenceSettings, resolve_device
from lymphnode.models.preprocess import Preprocess

SCORES = ("tta", "entropy", "tta_entropy")
_EPS = 1e-7  # probabilities are clamped to [eps, 1 - eps] before the logarithms


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Per-element binary entropy in bits of probabilities ``p`` (any shape): 0 at 0 and 1, 1 at
    0.5."""
    q = p.float().clamp(_EPS, 1.0 - _EPS)
    h = -(q * torch.log2(q) + (1.0 - q) * torch.log2(1.0 - q))
    return torch.where((p <= 0) | (p >= 1), torch.zeros_like(h), h)


def d4_probabilities(
    model: torch.nn.Module, x: torch.Tensor, *, bf16: bool = False
) -> torch.Tensor:
    """The 8 D4 predictions (8, B, H, W) float32 of a normalised batch ``x`` (B, 3, H, W), each
    mapped back to the input's frame (index k: rotate by 90°·(k % 4), flip if k ≥ 4, predict,
    undo). ``model`` has ``probabilities(x)`` (B, 1, H, W)."""
    return torch.stack([_predict(model, x, k, bf16) for k in range(8)])


def _predict(model: torch.nn.Module, x: torch.Tensor, k: int, bf16: bool) -> torch.Tensor:
    autocast = (
        torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    with autocast:
        probs = model.probabilities(_d4(x, k))  # type: ignore[operator]  # (B, 1, H, W)
    return _d4_inverse(probs.float(), k)[:, 0]  # (B, H, W)


def tta_disagreement(views: torch.Tensor) -> torch.Tensor:
    """Per-pixel disagreement (B, H, W) in [0, 1] of D4 views (8, B, H, W): 4 × their variance
    (population variance, over the 8 views)."""
    return 4.0 * views.var(dim=0, unbiased=False)


@torch.no_grad()
def batch_scores(
    model: torch.nn.Module, x: torch.Tensor, score: str, *, bf16: bool = False
) -> torch.Tensor:
    """One uncertainty score per tile (B,) float32 (see the module docstring) for a normalised
    batch ``x`` (B, 3, H, W) on the model's device."""
    validate.choice("score", score, SCORES)
    if score == "entropy":
        return binary_entropy(_predict(model, x, 0, bf16)).mean(dim=(1, 2))
    views = d4_probabilities(model, x, bf16=bf16)  # (8, B, H, W)
    disagreement = tta_disagreement(views).mean(dim=(1, 2))
    if score == "tta":
        return disagreement
    return 0.5 * (disagreement + binary_entropy(views.mean(dim=0)).mean(dim=(1, 2)))


def tile_scores(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    preprocess: Preprocess,
    settings: InferenceSettings,
    score: str,
    on_batch: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every tile of ``batches`` (stain-normalised uint8 tiles (B, P, P, 3), level-0
    top-left corners (B, 2), as :class:`lymphnode.inference.grid.TileDataset` yields them).

    The tiles are normalised on the device by :meth:`Preprocess.normalize`; ``settings`` gives the
    device, bf16, channels_last and torch threads (``settings.tta`` is not used: ``score`` decides
    the views). Returns (corners (N, 2) int64 level-0 (x, y), scores (N,) float64).
    """
    validate.choice("score", score, SCORES)
    device = resolve_device(settings.device)
    model = model.to(device).eval()
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    corners: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    with _torch_settings(model_threads(settings, device), device), torch.inference_mode():
        for images, xy in batches:
            x = preprocess.normalize(images, device, channels_last=settings.channels_last)
            s = batch_scores(model, x, score, bf16=settings.bf16)
            corners.append(xy.numpy().astype(np.int64))
            scores.append(s.double().cpu().numpy())
            if on_batch is not None:
                on_batch(len(images))
    if not corners:
        return np.empty((0, 2), np.int64), np.empty(0, np.float64)
    return np.concatenate(corners), np.concatenate(scores)


__all__ = [
    "SCORES",
    "batch_scores",
    "binary_entropy",
    "d4_probabilities",
    "tile_scores",
    "tta_disagreement",
]

"""The cross-centre methods (#18): re-staining, RandStainNA, test-time BatchNorm adaptation and
semi-supervised fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from torch import nn

from lymphnode.core.errors import ConfigError
from lymphnode.data.datamodules import FinetuneDataModule
from lymphnode.data.stain_transfer import (
    RandStainNA,
    StainBank,
    fit_lab_distribution,
    fit_source,
    transfer,
)
from lymphnode.inference.adapt import adapt_batchnorm, batchnorm_layers
from lymphnode.models.stain import MacenkoNormalizer
from lymphnode.models.unet import UNet
from lymphnode.tasks.semi import SemiSettings, pseudo_label_loss, strong_stain
from tests import tiny_runs

# Two H&E-like stain matrices (unit OD rows: haematoxylin, eosin) of different centres.
# Every channel of each stain absorbs enough that pure-stain pixels count as tissue (OD > 0.15).
STAINS_A = np.array([[0.65, 0.70, 0.29], [0.30, 0.90, 0.30]])
STAINS_B = np.array([[0.55, 0.78, 0.30], [0.28, 0.80, 0.52]])


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def stained_image(stains: np.ndarray, seed: int = 0, size: int = 96) -> np.ndarray:
    """(size, size, 3) uint8 RGB made from concentrations (H, E) with the given stain matrix:
    nuclei (H-rich discs) on eosin-rich stroma, Beer-Lambert OD = C @ stains."""
    rng = np.random.default_rng(seed)
    conc = np.zeros((size, size, 2))
    conc[..., 1] = rng.uniform(0.6, 1.0, (size, size))  # eosin stroma
    yy, xx = np.mgrid[:size, :size]
    for _ in range(12):  # haematoxylin nuclei
        cy, cx = rng.integers(8, size - 8, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(16, 50)
        conc[disc, 0] = rng.uniform(0.8, 1.4)
        conc[disc, 1] = 0.0
    od = conc @ _unit(stains)
    return np.clip(255 * np.exp(-od), 0, 255).round().astype(np.uint8)


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    """Degrees between two vectors."""
    cos = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return math.degrees(math.acos(min(1.0, cos)))


# ------------------------------------------------------------------------------ re-staining
def test_macenko_recovers_a_known_stain_matrix() -> None:
    bank = StainBank.fit([stained_image(STAINS_A)], "macenko")
    matrix = np.array(bank.states[0]["stain_matrix"])
    truth = _unit(STAINS_A)
    assert _angle(matrix[0], truth[0]) < 3.0  # haematoxylin first
    assert _angle(matrix[1], truth[1]) < 3.0


def test_restaining_gives_the_target_centres_stain_matrix() -> None:
    source = stained_image(STAINS_A, seed=1)
    bank = StainBank.fit([stained_image(STAINS_B, seed=2)], "macenko")
    restained = bank.restain(source, bank.index_for(0))
    recovered = MacenkoNormalizer().fit(restained).stain_matrix
    assert recovered is not None
    truth_b, truth_a = _unit(STAINS_B), _unit(STAINS_A)
    for k in range(2):
        assert _angle(recovered[k], truth_b[k]) < 4.0
    # ... and it moved away from the source's own stains
    assert _angle(recovered[1], truth_a[1]) > 10.0


def _lab_tissue_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB).reshape(-1, 3)
    tissue = lab[lab[:, 0] < 90]
    return tissue.mean(0), tissue.std(0)


def test_reinhard_restaining_matches_the_target_statistics() -> None:
    target = stained_image(STAINS_B, seed=3)
    bank = StainBank.fit([target], "reinhard", pool_intensity=False)
    out = bank.restain(stained_image(STAINS_A, seed=4), 0)
    mean, std = _lab_tissue_stats(out)
    want_mean, want_std = _lab_tissue_stats(target)
    np.testing.assert_allclose(mean, want_mean, atol=1.5)  # LAB units (8-bit LAB rounding)
    np.testing.assert_allclose(std, want_std, atol=1.5)


def test_stain_bank_pools_intensity_keeps_chroma_and_skips_blank_images() -> None:
    images = [
        stained_image(STAINS_A, 5),
        stained_image(STAINS_B, 6),
        np.full((64, 64, 3), 250, np.uint8),
    ]
    bank = StainBank.fit(images, "reinhard", names=["a", "b", "blank"])
    assert bank.names == ["a", "b"] and bank.skipped == 1
    raw = StainBank.fit(images[:2], "reinhard", pool_intensity=False)
    lightness = np.median([s["mean"][0] for s in raw.states])
    assert [s["mean"][0] for s in bank.states] == pytest.approx([lightness, lightness])
    assert [s["mean"][1:] for s in bank.states] == [s["mean"][1:] for s in raw.states]
    macenko = StainBank.fit(images[:2], "macenko")
    assert macenko.states[0]["max_concentrations"] == macenko.states[1]["max_concentrations"]
    assert macenko.states[0]["stain_matrix"] != macenko.states[1]["stain_matrix"]


def test_stain_bank_targets_are_seeded_per_patch() -> None:
    bank = StainBank.fit([stained_image(STAINS_A, s) for s in range(5)], "reinhard")
    picks = [bank.index_for(k, seed=0) for k in range(40)]
    assert picks == [bank.index_for(k, seed=0) for k in range(40)]
    assert len(set(picks)) > 1
    assert picks != [bank.index_for(k, seed=1) for k in range(40)]


def test_set_level_transfer_keeps_differences_between_patches() -> None:
    """With the source stain of the whole set, a dark patch stays darker than a pale one (a
    per-patch normaliser maps both to the same statistics)."""
    pale = stained_image(STAINS_A, seed=11)
    dark = np.clip(pale.astype(np.int16) - 60, 0, 255).astype(np.uint8)
    target = [stained_image(STAINS_B, seed=12)]
    for method in ("macenko", "reinhard"):
        bank = StainBank.fit(target, method)
        source = fit_source([pale, dark], method)
        l_pale = _lab_tissue_stats(bank.restain(pale, 0, source))[0][0]
        l_dark = _lab_tissue_stats(bank.restain(dark, 0, source))[0][0]
        assert l_dark < l_pale - 5, method  # LAB lightness units
        l_pale_own = _lab_tissue_stats(bank.restain(pale, 0))[0][0]
        l_dark_own = _lab_tissue_stats(bank.restain(dark, 0))[0][0]
        assert abs(l_dark_own - l_pale_own) < abs(l_dark - l_pale), method
    # the fixed map takes a set stained with A to B's stain vectors
    source = fit_source([stained_image(STAINS_A, seed=k) for k in range(3)], "macenko")
    bank = StainBank.fit([stained_image(STAINS_B, seed=13)], "macenko")
    recovered = MacenkoNormalizer().fit(bank.restain(stained_image(STAINS_A, 14), 0, source))
    assert recovered.stain_matrix is not None
    for k in range(2):
        assert _angle(recovered.stain_matrix[k], _unit(STAINS_B)[k]) < 4.0
    with pytest.raises(ConfigError, match="one method"):
        transfer(pale, source, StainBank.fit(target, "reinhard").states[0])


def test_stain_bank_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="method='vahadane'"):
        StainBank.fit([stained_image(STAINS_A)], "vahadane")
    with pytest.raises(ConfigError, match="no image with an estimable stain"):
        StainBank.fit([np.full((32, 32, 3), 255, np.uint8)], "macenko")


# ------------------------------------------------------------------------------- RandStainNA
def test_lab_distribution_is_the_per_image_statistics() -> None:
    images = [stained_image(STAINS_A, s) for s in range(4)]
    dist = fit_lab_distribution(images)
    raw = StainBank.fit(images, "reinhard", pool_intensity=False)
    means = np.array([s["mean"] for s in raw.states])
    np.testing.assert_allclose(dist.mean_mu, means.mean(0))
    np.testing.assert_allclose(dist.mean_sd, means.std(0, ddof=1))
    assert dist.n_images == 4
    with pytest.raises(ConfigError, match="at least 2 images"):
        fit_lab_distribution(images[:1])


def test_randstain_draws_seeded_stains_from_the_distribution() -> None:
    dist = fit_lab_distribution([stained_image(STAINS_B, s) for s in range(6)])
    image = stained_image(STAINS_A, seed=9)

    def apply(seed: int, p: float = 1.0) -> np.ndarray:
        pipeline = A.Compose([RandStainNA(dist, spread=1.0, p=p)], seed=seed)
        return pipeline(image=image)["image"]

    out = apply(0)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, apply(0))  # seeded
    assert not np.array_equal(out, apply(1))
    np.testing.assert_array_equal(apply(0, p=0.0), image)
    # spread 0: exactly the distribution's mean stain
    pinned = A.Compose([RandStainNA(dist, spread=0.0, p=1.0)], seed=3)(image=image)["image"]
    mean, _ = _lab_tissue_stats(pinned)
    np.testing.assert_allclose(mean, dist.mean_mu, atol=1.5)
    with pytest.raises(ConfigError, match="spread"):
        RandStainNA(dist, spread=-1.0)


def test_datamodule_fits_randstain_from_a_cache(tmp_path: Path) -> None:
    caches = tiny_runs.write_caches(tmp_path)
    dm = FinetuneDataModule(
        caches / "labeled", caches / "test", labeled_size=10, folds=5,
        transforms={"randstain": {"cache": str(caches / "unlabeled"), "n_patches": 20}},
    )  # fmt: skip
    assert dm.randstain is not None
    assert dm.randstain["distribution"].n_images == 20
    names = [type(t).__name__ for t in dm.train_transform().transforms]
    assert "RandStainNA" in names
    with pytest.raises(ConfigError, match=r"transforms\.randstain"):
        FinetuneDataModule(caches / "labeled", caches / "test", labeled_size=10, folds=5,
                           transforms={"randstain": {"n_patches": 20}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"randstain\.p"):
        FinetuneDataModule(caches / "labeled", caches / "test", labeled_size=10, folds=5,
                           transforms={"randstain": {"cache": "x", "p": 2}})  # fmt: skip


# ---------------------------------------------------------------------------------- AdaBN
def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(base_width=4, depth=2)


def test_adabn_changes_batchnorm_statistics_not_weights() -> None:
    net = _tiny_unet().eval()
    params = {k: v.clone() for k, v in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    target = [torch.randn(4, 3, 32, 32) * 2 + 1 for _ in range(3)]  # another "stain"
    record = adapt_batchnorm(net, target, lambda x: net(x).seg)
    assert record == {"statistics": "adapted", "tiles": 12, "batches": 3,
                      "layers": len(batchnorm_layers(net))}  # fmt: skip
    for name, value in net.named_parameters():
        assert torch.equal(value, params[name]), name  # weights bit-identical
    after = {k: v for k, v in net.state_dict().items() if "running" in k}
    assert all(not torch.equal(after[k], before[k]) for k in before if "mean" in k)
    assert not net.training  # left in evaluation mode
    assert all(m.momentum == 0.1 for m in batchnorm_layers(net))  # momentum restored
    # the first layer's running mean is the average of the target batches' channel means
    first = batchnorm_layers(net)[0]
    conv = net.encoder[0][0]  # DoubleConv: conv -> BatchNorm -> ReLU -> ...
    assert first is net.encoder[0][1]
    with torch.no_grad():  # equal batches: the mean of batch means is the mean over all tiles
        feats = torch.cat([conv(x) for x in target])
    torch.testing.assert_close(first.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def test_adabn_can_adapt_only_the_shallow_layers() -> None:
    net = _tiny_unet().eval()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k}
    record = adapt_batchnorm(net, [torch.randn(4, 3, 32, 32) + 1], lambda x: net(x).seg, layers=2)
    assert record["layers"] == 2
    names = [n for n, m in net.named_modules() if m in batchnorm_layers(net)]
    after = {k: v for k, v in net.state_dict().items() if "running_mean" in k}
    changed = [n for n in names if not torch.equal(after[f"{n}.running_mean"],
                                                   before[f"{n}.running_mean"])]  # fmt: skip
    assert changed == names[:2]  # the first two in module order, the rest the checkpoint's
    with pytest.raises(ConfigError, match="layers=0"):
        adapt_batchnorm(net, [torch.randn(1, 3, 32, 32)], None, layers=0)


def test_adabn_refuses_networks_without_batchnorm_and_empty_input() -> None:
    with pytest.raises(ConfigError, match="without BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), [])
    with pytest.raises(ConfigError, match="no batch"):
        adapt_batchnorm(_tiny_unet(), [], None)


# ------------------------------------------------------------------------------ semi-supervised
def test_semi_settings_defaults_and_refusals() -> None:
    assert SemiSettings.parse(None) is None
    s = SemiSettings.parse({"warmup_steps": 10})
    assert s is not None and s.threshold == 0.95 and s.weight_at(5) == pytest.approx(0.5)
    assert s.weight_at(50) == 1.0
    for bad, match in (({"threshold": 1.0}, "threshold"), ({"sigma": 1.5}, "sigma"),
                       ({"wieght": 1}, "wieght"), ({"weight": -1}, "weight")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            SemiSettings.parse(bad)


def test_strong_stain_is_per_pixel_so_pseudo_labels_stay_aligned() -> None:
    s = SemiSettings.parse({})
    assert s is not None
    rgb = torch.rand(2, 3, 16, 16)
    perm = torch.randperm(16 * 16)

    def shuffle(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)[:, :, perm].view_as(x)

    out = strong_stain(rgb, s, torch.Generator().manual_seed(0))
    out_perm = strong_stain(shuffle(rgb), s, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_perm, shuffle(out))  # no pixel moves
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, rgb, atol=0.05)


def test_pseudo_label_loss_by_hand() -> None:
    weak = torch.tensor([[[[0.99, 0.5], [0.02, 0.97]]]])  # confident: 0.99 (1), 0.02 (0), 0.97 (1)
    logits = torch.tensor([[[[2.0, 0.0], [-1.0, -3.0]]]])
    loss, share = pseudo_label_loss(logits, weak, threshold=0.95)
    bce = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(3.0))]
    assert loss.item() == pytest.approx(sum(bce) / 4)
    assert share.item() == pytest.approx(0.75)


def test_semi_training_step_adds_the_pseudo_label_loss() -> None:
    from lymphnode.models.preprocess import Preprocess
    from lymphnode.tasks.multitask import MultiTaskModule

    torch.manual_seed(0)
    net = {"_target_": "lymphnode.models.UNet", "base_width": 4, "depth": 2}
    task = MultiTaskModule(net=net, preprocess=Preprocess(0, 32),
                           semi={"threshold": 0.5, "warmup_steps": 0})  # fmt: skip
    task.log = lambda *a, **k: None  # type: ignore[method-assign]  (no trainer attached)
    labeled = {"image": torch.randn(2, 3, 32, 32), "mask": torch.zeros(2, 1, 32, 32)}
    unlabeled = {"image": torch.randn(2, 3, 32, 32)}
    torch.manual_seed(1)
    with_semi = task.training_step({"labeled": labeled, "unlabeled": unlabeled}, 1)
    state = {k: v.clone() for k, v in task.state_dict().items()}
    task.semi = None
    task.load_state_dict(state)
    supervised = task.training_step(labeled, 1)
    assert with_semi.item() > supervised.item() + 1e-3  # threshold 0.5: every pixel pseudo-labelled
    task.semi = SemiSettings.parse({})
    with pytest.raises(ConfigError, match=r"data\.unlabeled_dir"):
        task.training_step(labeled, 1)


@pytest.mark.slow
def test_semi_supervised_tiny_run(tmp_path: Path) -> None:
    caches = tiny_runs.write_caches(tmp_path / "caches")
    _, results = tiny_runs.run(
        tmp_path, caches, "semi=fixmatch", "trainer.max_steps=4", "trainer.max_epochs=-1",
        "task.semi.warmup_steps=0", "task.semi.threshold=0.5",
    )  # fmt: skip
    assert results["status"] == "completed", results.get("error")
    assert any(p.name.startswith("scratch+fixmatch") for p in (tmp_path / "runs").iterdir())
    assert results["config"]["task"]["semi"]["threshold"] == 0.5
    # the task refuses semi without unlabeled batches
    _, results = tiny_runs.run(
        tmp_path / "b", caches, "semi=fixmatch", "data.unlabeled_dir=null",
        "trainer.max_steps=2", "trainer.max_epochs=-1",
    )  # fmt: skip
    assert results["status"] == "failed" and "data.unlabeled_dir" in results["error"]


def test_infer_adaptation_skips_networks_without_batchnorm() -> None:
    from lymphnode.inference.predict import adapted_to
    from lymphnode.inference.settings import InferenceSettings
    from lymphnode.models.preprocess import Preprocess

    net = UNet(base_width=4, depth=2, norm="group")
    settings = InferenceSettings(adapt_bn=True, num_workers=0, device="cpu")
    tiles = [0, 1, 2]  # only its length is read before the network is checked
    with adapted_to(net, tiles, Preprocess(0, 32), settings, "s") as record:  # type: ignore[arg-type]
        assert record == {"statistics": "source"}

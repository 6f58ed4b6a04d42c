"""The pretext tasks beyond the paper's reconstruction: masked, contrastive (SimCLR) and stain.

Each: its loss decreases on a tiny fit, its weights transfer into fine-tuning (the whole network,
or only the encoder for the contrastive one) and a combination it cannot train is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from skimage.color import rgb2hed
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lymphnode.core.errors import ConfigError
from lymphnode.models.checkpoint import load_pretrained_weights
from lymphnode.models.unet import UNetOutput
from lymphnode.tasks import ContrastiveModule, MaskedModule, MultiTaskModule, StainModule
from lymphnode.tasks.contrastive import pair_accuracy
from lymphnode.tasks.masked import block_masks
from lymphnode.tasks.stain import grayscale, hed_to_rgb, jitter_hed, rgb_to_hed

SIZE = 32
NET = {"_target_": "lymphnode.models.UNet", "base_width": 4, "depth": 2}
CONTRACT = {"level": 0, "patch_size": SIZE, "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}


def smooth_images(n: int, seed: int = 0) -> Tensor:
    """(n, 3, SIZE, SIZE) low-frequency images in normalised units (-1..1): hidden blocks can be
    inferred from their surroundings, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 3, 3, generator=g) * 1.6 - 0.8
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


class Patches(Dataset):
    """Smooth images; with ``views=2`` also ``image2``: a flipped, slightly noisy copy."""

    def __init__(self, n: int = 8, views: int = 1) -> None:
        self.images, self.views = smooth_images(n), views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"image": self.images[i]}
        if self.views == 2:
            g = torch.Generator().manual_seed(1000 + i)
            item["image2"] = self.images[i].flip(-1) + 0.05 * torch.randn(
                3, SIZE, SIZE, generator=g
            )
        return item


def fit(module: pl.LightningModule, tmp_path: Path, steps: int, views: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    pl.seed_everything(0)
    loader = DataLoader(Patches(views=views), batch_size=8, shuffle=True)
    trainer.fit(module, loader)
    return trainer


def eval_loss(module: pl.LightningModule, views: int = 1) -> float:
    """The module's validation loss on the fixed batch (seeded masks / jitter)."""
    batch = {k: torch.stack([Patches(views=views)[i][k] for i in range(8)]) for k in ["image"]}
    if views == 2:
        batch["image2"] = torch.stack([Patches(views=2)[i]["image2"] for i in range(8)])
    module.eval()
    with torch.no_grad():
        loss = module._step(batch, 0, "val") if views == 1 else module._step(batch, "val")
    module.train()
    return float(loss[0] if isinstance(loss, tuple) else loss)


def optimizer(lr: float = 3e-3) -> dict:
    return {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": lr}


def quiet(module: pl.LightningModule) -> pl.LightningModule:
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # _step outside a trainer
    return module


# --- masked -------------------------------------------------------------------------------
def test_block_masks_hide_exactly_the_ratio_of_cells_in_whole_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    masks = block_masks(5, 40, 24, 8, 0.6, generator=g)  # 5 x 3 cells, last row clipped
    assert masks.shape == (5, 1, 40, 24)
    cells = masks[:, 0, ::8, ::8]  # (5, 5, 3): one value per cell
    assert (cells.flatten(1).sum(1) == round(0.6 * 15)).all()
    blocks = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :40, :24]
    assert torch.equal(blocks, masks[:, 0])  # every cell is constant: whole blocks
    again = block_masks(5, 40, 24, 8, 0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_masked_loss_counts_only_the_hidden_pixels() -> None:
    module = quiet(MaskedModule(net=NET, block=8, ratio=0.5, fill="zero", preprocess=CONTRACT))
    x = smooth_images(2)
    mask = module.masks_for(x, "val", 3)
    # a network that returns its input: the loss is the mean squared value of the hidden pixels
    # (they were replaced by 0), whatever the visible ones hold
    module.net = _Identity()
    loss, *_ = module._step({"image": x}, 3, "val")
    hidden = mask.expand_as(x).bool()
    assert loss.item() == pytest.approx(x[hidden].pow(2).mean().item(), rel=1e-5)


class _Identity(nn.Module):
    def forward(self, x: Tensor) -> UNetOutput:
        return UNetOutput(recon=x, seg=x[:, :1])


def test_masked_pretraining_loss_decreases_and_transfers_the_whole_network(tmp_path) -> None:
    module = MaskedModule(
        net=NET, block=8, ratio=0.5, optimizer=optimizer(1e-2), preprocess=CONTRACT,
        log_images_every_n_epochs=0,
    )  # fmt: skip
    quiet(module)
    before = eval_loss(module)
    trainer = fit(module, tmp_path, 120)
    after = eval_loss(module)
    assert after < 0.8 * before  # measured 0.142 -> 0.096
    assert module.fill_value.abs().sum() > 0  # the learned fill trained
    assert module.net.seg_head.weight.grad is None  # frozen head
    ckpt = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(ckpt)
    fine = MultiTaskModule(net=NET, preprocess=CONTRACT)
    report = load_pretrained_weights(fine.net, ckpt)
    assert report.transfer == "network" and not report.missing
    for name, value in module.net.state_dict().items():
        assert torch.equal(fine.net.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, "ratio=1.0 is invalid"),
        ({"ratio": 0.0}, r"ratio must be a finite number in \(0, 1\]"),
        ({"block": 0}, "block must be an integer >= 1"),
        ({"fill": "noise"}, r"fill must be one of \['learned', 'zero'\]"),
    ],
)
def test_masked_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MaskedModule(net=NET, **kwargs)


# --- stain --------------------------------------------------------------------------------
def test_rgb_to_hed_is_scikit_images_rgb2hed_and_hed_to_rgb_inverts_it() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.05, 1.0, (2, 5, 7, 3))
    ours = rgb_to_hed(torch.from_numpy(rgb).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, rgb2hed(rgb), atol=1e-12)
    raw = rgb_to_hed(torch.from_numpy(rgb).permute(0, 3, 1, 2), clip=False)
    assert raw.min() < 0  # some of these colours lie outside the stains' span
    back = hed_to_rgb(raw).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(back, rgb, atol=1e-9)


def test_grayscale_and_hed_jitter_inputs_hide_the_stain() -> None:
    rgb = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    grey = grayscale(rgb)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    expected = 0.2125 * rgb[:, 0] + 0.7154 * rgb[:, 1] + 0.0721 * rgb[:, 2]
    assert torch.allclose(grey[:, 0], expected)
    same = jitter_hed(rgb, 0.0, 0.0, torch.Generator().manual_seed(1))
    assert torch.allclose(same, rgb, atol=1e-5)  # no perturbation: the same colours
    moved = jitter_hed(rgb, 0.5, 0.02, torch.Generator().manual_seed(1))
    assert (moved - rgb).abs().max() > 0.05


@pytest.mark.parametrize("stain_input", ["grayscale", "hed_jitter"])
def test_stain_pretraining_loss_decreases_and_transfers(tmp_path, stain_input: str) -> None:
    module = StainModule(
        net=NET, input=stain_input, optimizer=optimizer(1e-2), preprocess=CONTRACT,
        log_images_every_n_epochs=0,
    )  # fmt: skip
    quiet(module)
    before = eval_loss(module)
    trainer = fit(module, tmp_path, 120)
    assert eval_loss(module) < 0.5 * before  # measured 0.85 -> 0.04 (grey), 0.41 -> 0.05 (HED)
    ckpt = tmp_path / "stain.ckpt"
    trainer.save_checkpoint(ckpt)
    fine = MultiTaskModule(net=NET, preprocess=CONTRACT)
    report = load_pretrained_weights(fine.net, ckpt)
    assert report.transfer == "network" and len(report.loaded) == len(fine.net.state_dict())


def test_stain_targets_are_the_scaled_h_and_e_densities() -> None:
    module = StainModule(net=NET, scale=10.0, preprocess=CONTRACT)
    x = smooth_images(1)
    _, target, rgb = module.inputs_and_targets(x, "val", 0)
    expected = rgb2hed(rgb[0].permute(1, 2, 0).double().numpy())[..., :2] * 10.0
    np.testing.assert_allclose(target[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


# --- contrastive ----------------------------------------------------------------------------
def test_pair_accuracy_counts_partners_found() -> None:
    z = torch.eye(4)
    assert pair_accuracy(z, z).item() == 1.0
    assert pair_accuracy(z, z[[1, 0, 2, 3]]).item() == 0.5


def test_contrastive_pretraining_trains_the_encoder_only_and_transfers_it(tmp_path) -> None:
    module = ContrastiveModule(
        net=NET, optimizer=optimizer(1e-2), preprocess=CONTRACT, hidden_dim=32, projection_dim=16,
        log_images_every_n_epochs=0,
    )  # fmt: skip
    quiet(module)
    decoder_before = {k: v.clone() for k, v in module.net.state_dict().items()}
    before = eval_loss(module, views=2)
    trainer = fit(module, tmp_path, 40, views=2)
    assert eval_loss(module, views=2) < before - 0.3
    state = module.net.state_dict()
    changed = {k for k in state if not torch.equal(state[k], decoder_before[k])}
    assert changed and all(k.startswith("encoder.") for k in changed)  # decoder/heads untouched
    ckpt = tmp_path / "simclr.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["lymphnode"]["transfer"] == "encoder"
    fine = MultiTaskModule(net=NET, preprocess=CONTRACT)
    fresh = {k: v.clone() for k, v in fine.net.state_dict().items()}
    report = load_pretrained_weights(fine.net, ckpt)
    assert report.transfer == "encoder" and not report.missing and not report.unexpected
    assert report.loaded and all(k.startswith("encoder.") for k in report.loaded)
    for name, value in fine.net.state_dict().items():
        source = state[name] if name.startswith("encoder.") else fresh[name]
        assert torch.equal(value, source), name


class _TrainLosses(pl.Callback):
    """The logged training losses of each step."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.rows = keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append([float(trainer.callback_metrics[k]) for k in self.keys])


def test_dense_contrastive_lowers_its_local_and_global_terms_and_transfers_the_encoder(
    tmp_path,
) -> None:
    module = ContrastiveModule(
        net=NET, optimizer=optimizer(1e-2), preprocess=CONTRACT, hidden_dim=32, projection_dim=16,
        dense_weight=0.5, dense_memory=1024, log_images_every_n_epochs=0,
    )  # fmt: skip
    decoder_before = {k: v.clone() for k, v in module.net.state_dict().items()}
    losses = _TrainLosses(["train/global_loss", "train/dense_loss", "train/loss"])
    trainer = pl.Trainer(
        max_steps=60, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[losses],
    )  # fmt: skip
    pl.seed_everything(0)
    trainer.fit(module, DataLoader(Patches(views=2), batch_size=8, shuffle=True))
    rows = torch.tensor(losses.rows)  # (steps, 3)
    torch.testing.assert_close(rows[:, 2], 0.5 * rows[:, 0] + 0.5 * rows[:, 1])
    # the bank holds real locations from the second step on: compare later steps with those
    early, late = rows[1:6].mean(0), rows[-5:].mean(0)
    assert late[0] < 0.5 * early[0] and late[1] < early[1] - 0.3, (early, late)
    state = module.net.state_dict()
    changed = {k for k in state if not torch.equal(state[k], decoder_before[k])}
    assert changed and all(k.startswith("encoder.") for k in changed)
    ckpt = tmp_path / "densecl.ckpt"
    trainer.save_checkpoint(ckpt)
    report = load_pretrained_weights(MultiTaskModule(net=NET, preprocess=CONTRACT).net, ckpt)
    assert report.transfer == "encoder" and report.loaded
    assert all(k.startswith("encoder.") for k in report.loaded)


def test_dense_loss_pairs_each_location_with_its_most_similar_partner() -> None:
    """Identical views: each location's partner is itself, so the positives match exactly and
    the loss is lower than for views whose locations are re-ordered within a feature map
    (the partner search finds them again: the same loss) or whose maps come from other patches."""
    torch.manual_seed(0)
    module = ContrastiveModule(
        net=NET, preprocess=CONTRACT, hidden_dim=32, projection_dim=16, dense_weight=1.0,
        dense_memory=512,
    ).eval()  # fmt: skip
    f = torch.randn(4, 16, 4, 4)
    with torch.no_grad():
        same = module.dense_loss(f, f)
        rolled = module.dense_loss(f, f.flatten(2).roll(5, dims=2).view_as(f))
        other = module.dense_loss(f, torch.randn(4, 16, 4, 4))
    torch.testing.assert_close(same, rolled)
    assert same < other - 0.5


def test_dense_loss_banks_keep_each_directions_partners_for_later_steps() -> None:
    """Each direction has its own memory bank: after a training step bank 0 holds the view-2
    partners of view 1's locations and bank 1 the view-1 partners of view 2's, so neither
    direction ever meets its own queries of the step among its negatives."""
    from lightly.models.utils import select_most_similar

    torch.manual_seed(1)
    module = ContrastiveModule(
        net=NET, preprocess=CONTRACT, hidden_dim=32, projection_dim=16, dense_weight=0.5,
        dense_memory=256,
    )  # fmt: skip
    f1 = torch.randn(2, 16, 4, 4, requires_grad=True)  # requires_grad: a training step
    f2 = torch.randn(2, 16, 4, 4, requires_grad=True)
    module.dense_loss(f1, f2).backward()
    a, b = (f.detach().flatten(2).transpose(1, 2) for f in (f1, f2))  # (2, 16, C)
    with torch.no_grad():
        da, db = module.dense_head(a), module.dense_head(b)
        pa = F.normalize(select_most_similar(a, b, db).flatten(0, 1), dim=1)  # (32, D)
        pb = F.normalize(select_most_similar(b, a, da).flatten(0, 1), dim=1)
    banks = [c.memory_bank.bank for c in module.dense_criteria]
    torch.testing.assert_close(banks[0][:32], pa)
    torch.testing.assert_close(banks[1][:32], pb)
    assert not torch.allclose(banks[0][:32], pb)


class NoEncoder(nn.Module):
    """A network without encode(): the contrastive pretext cannot pool its features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> UNetOutput:
        h = self.conv(x)
        return UNetOutput(recon=h[:, :3], seg=h[:, 3:])


def test_contrastive_refuses_a_network_without_an_encoder() -> None:
    # the network contract, checked once when the task builds it: class and every missing member
    with pytest.raises(
        ConfigError,
        match=r"network test_pretexts\.NoEncoder does not implement the network contract .*: it "
        r"lacks encoder_prefix, in_channels, seg_head, recon_head, config, min_size, "
        r"encoder_channels, encode, depth_groups, prepare_transfer$",
    ):
        ContrastiveModule(net={"_target_": "test_pretexts.NoEncoder"})


def test_contrastive_batches_need_two_views() -> None:
    module = quiet(ContrastiveModule(net=NET, preprocess=CONTRACT))
    with pytest.raises(ConfigError, match="image2"):
        module._step({"image": smooth_images(2)}, "train")


def test_unet_encode_is_the_bottleneck_that_forward_computes() -> None:
    from lymphnode.models import UNet

    net = UNet(base_width=4, depth=2).eval()
    seen: list[Tensor] = []
    net.encoder[2].register_forward_hook(lambda m, i, o: seen.append(o))
    x = smooth_images(2)
    net(x)
    features = net.encode(x)
    assert features.shape == (2, net.encoder_channels, SIZE // 4, SIZE // 4) == (2, 16, 8, 8)
    assert torch.equal(features, seen[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0}, r"temperature must be a finite number > 0, got 0"),
        ({"dense_weight": 1.5}, r"dense_weight must be a finite number in 0\.\.1, got 1.5"),
        ({"dense_weight": -0.1}, r"dense_weight must be a finite number in 0\.\.1, got -0.1"),
        ({"dense_memory": 0}, r"dense_memory must be an integer >= 1, got 0"),
    ],
)
def test_contrastive_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ContrastiveModule(net=NET, preprocess=CONTRACT, **kwargs)

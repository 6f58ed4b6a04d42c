"""The network contract in the tasks and ``task.encoder_lr_scale`` (issue #20, parts 1 and 4): the
encoder trains at its own lr (0: frozen) whatever initialised it; the older ``pretrained_lr_*``
recipe keeps its optimizer groups; a network without a reconstruction head fine-tunes."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_tasks import TINY, _fit_steps, loader, multitask_module, pretrain_ckpt  # noqa: F401
from test_vit import DECODER, reference, save_in_layout
from test_vit import TINY as VIT_TINY

from lymphnode.core.errors import ConfigError
from lymphnode.tasks import MaskedModule, MultiTaskModule, ReconstructionModule, StainModule

torch.set_num_threads(1)
SIZE = 32  # px: UNI's patch 16 divides it
VIT = {"_target_": "lymphnode.models.ViTUNet", "preset": "uni", "vit_kwargs": VIT_TINY,
       "decoder_channels": DECODER}  # fmt: skip
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)  # decay shows any update


def _fit(module: MultiTaskModule, tmp_path: Path, steps: int = 3) -> None:
    t = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    t.fit(module, loader(n=4 * steps, size=SIZE))


def _state(module: MultiTaskModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.net.named_parameters()}


def _group_names(module: MultiTaskModule, groups: list[dict]) -> list[list[str]]:
    names = {id(p): n for n, p in module.net.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in groups]


def test_the_real_dev_finetune_recipe_keeps_its_optimizer_groups(pretrain_ckpt) -> None:  # noqa: F811
    """FINETUNE_RECIPE (task.pretrained_lr_scale=0.1 task.pretrained_lr_scope=encoder): the
    pretrained encoder, sorted by name, at lr x 0.1, then the rest in the network's order at lr
    (as before encoder_lr_scale existed: a run's weights after 3 steps were bit-identical); on a
    fully loaded encoder, encoder_lr_scale=0.1 is the same optimizer."""
    kwargs = {"net": {**TINY, "top_skip": False}, "optimizer": ADAMW, "scheduler": None}
    recipe = multitask_module(
        **kwargs, pretrained=str(pretrain_ckpt), pretrained_lr_scale=0.1,
        pretrained_lr_scope="encoder",
    )  # fmt: skip
    encoder = [n for n, _ in recipe.net.named_parameters() if n.startswith("encoder.")]
    rest = [n for n, _ in recipe.net.named_parameters() if not n.startswith("encoder.")]
    optimizer = recipe.configure_optimizers()
    assert _group_names(recipe, optimizer.param_groups) == [sorted(encoder), rest]
    assert (len(encoder), len(rest)) == (18, 20)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-2])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1]
    same = multitask_module(**kwargs, pretrained=str(pretrain_ckpt), encoder_lr_scale=0.1)
    groups = same.configure_optimizers().param_groups
    assert _group_names(same, groups) == [sorted(encoder), rest]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
    scratch = multitask_module(**kwargs, pretrained_lr_scale=0.1, pretrained_lr_scope="encoder")
    assert len(scratch.optimizer_param_groups()) == 1  # the recipe leaves scratch runs alone


def _vit_from_file(tmp_path: Path) -> dict:
    """A tiny UNI-quirked ViT filled from a weights file, as model.weights=<file> does."""
    path = save_in_layout("uni", reference("uni", seed=3), tmp_path)
    return {**VIT, "weights": str(path)}


@pytest.mark.parametrize("network", ["unet", "vit_from_file"])
def test_a_frozen_encoder_stays_bit_identical_while_the_decoder_learns(network, tmp_path) -> None:
    pl.seed_everything(0)
    net = {**TINY} if network == "unet" else _vit_from_file(tmp_path)
    module = multitask_module(
        net=net, encoder_lr_scale=0, optimizer=ADAMW, scheduler=None, patch_size=SIZE,
        log_images_every_n_epochs=0,
    )  # fmt: skip
    prefix = module.network.encoder_prefix
    assert module.encoder_parameter_names() == []  # out of the optimizer: no update, no decay
    before = _state(module)
    _fit(module, tmp_path)
    after = _state(module)
    encoder = [n for n in before if n.startswith(prefix)]
    assert encoder and all(torch.equal(before[n], after[n]) for n in encoder)
    decoder = [n for n in before if n.startswith(("decoder", "seg_head"))]
    assert decoder and any(not torch.equal(before[n], after[n]) for n in decoder)


def test_encoder_lr_scale_and_warm_up_freezing_need_no_pretrained_checkpoint(tmp_path) -> None:
    pl.seed_everything(1)
    module = multitask_module(
        net=TINY, encoder_lr_scale=0.1, freeze_encoder_steps=2, optimizer=ADAMW, scheduler=None,
        log_images_every_n_epochs=0,
    )  # fmt: skip
    encoder = [n for n, _ in module.net.named_parameters() if n.startswith("encoder.")]
    groups = module.optimizer_param_groups()
    assert _group_names(module, groups)[0] == sorted(encoder)
    assert [g.get("lr_scale", 1.0) for g in groups] == [0.1, 1.0]
    start = _state(module)
    record = _fit_steps(module, tmp_path, 3)
    assert record.lrs[0] == pytest.approx([1e-3, 1e-2])  # the encoder at lr x 0.1
    for step in (0, 1):  # fixed (not even weight decay) for the first two steps ...
        assert all(torch.equal(record.after[step][n], start[n]) for n in encoder), step
    assert not torch.equal(record.after[0]["seg_head.weight"], start["seg_head.weight"])
    assert all(not torch.equal(record.after[2][n], start[n]) for n in encoder)  # ... then trains


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoder_lr_scale": -1}, r"encoder_lr_scale must be a finite number >= 0, got -1"),
        ({"freeze_encoder_steps": 1.5}, r"freeze_encoder_steps must be an integer >= 0, got 1.5"),
        (
            {"encoder_lr_scale": 0.1, "pretrained_lr_scale": 0.1},
            r"encoder_lr_scale=0.1 / freeze_encoder_steps=0 cannot be combined with "
            r"pretrained_lr_scale=0.1 / freeze_pretrained_steps=0: expected one of the two",
        ),
    ],
)
def test_bad_encoder_settings_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        multitask_module(**kwargs)


def test_a_network_outside_the_contract_is_refused_once_naming_class_and_members() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^network torch\.nn\.modules\.linear\.Identity does not implement the network "
        r"contract \(lymphnode\.models\.contract\.SegmentationNetwork\): it lacks encoder_prefix, "
        r"in_channels, seg_head, recon_head, config, min_size, encoder_channels, encode, "
        r"depth_groups, prepare_transfer$",
    ):
        MultiTaskModule(net={"_target_": "torch.nn.Identity"})


def test_a_network_without_a_recon_head_fine_tunes_at_recon_weight_zero(tmp_path) -> None:
    pl.seed_everything(2)
    net = {**VIT, "recon": False}
    module = multitask_module(
        net=net, recon_weight=0, patch_size=SIZE, log_images_every_n_epochs=0, scheduler=None
    )
    assert module.network.recon_head is None
    before = _state(module)
    t = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    t.fit(module, loader(n=8, size=SIZE), loader(n=4, size=SIZE))
    assert "val/seg_f1" in t.callback_metrics
    assert not any(k.endswith("recon_mse") for k in t.callback_metrics)  # never computed
    assert not torch.equal(before["seg_head.weight"], module.net.seg_head.weight)


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda net: multitask_module(net=net, patch_size=SIZE), r"recon_weight=1\.0"),
        (lambda net: ReconstructionModule(net=net), "pretext reconstruction"),
        (lambda net: MaskedModule(net=net), "pretext masked"),
        (lambda net: StainModule(net=net), "pretext stain"),
    ],
)
def test_what_needs_a_recon_head_refuses_a_network_without_one(make, what: str) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"^{what} needs a network with a reconstruction head; ViTUNet was built without "
        r"one \(recon_head=None\); with model=vit set model.recon=true$",
    ):
        make({**VIT, "recon": False})

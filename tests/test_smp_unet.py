"""model=smp_unet: segmentation-models-pytorch's UNet with lymphnode's heads (shapes, reflect
padding, the zeroed top skip for ResNet and ConvNeXt, encode, encoder weight files, every task)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf

from lymphnode.core.errors import ConfigError
from lymphnode.models import SmpUNet, UNetOutput
from lymphnode.models.checkpoint import load_pretrained_weights
from lymphnode.models.registry import build_network
from lymphnode.models.smp_unet import load_encoder_weights
from lymphnode.tasks import (
    ContrastiveModule,
    MaskedModule,
    MultiTaskModule,
    ReconstructionModule,
    StainModule,
)

SIZE = 64
SMALL = [32, 16, 16, 8, 8]  # decoder channels at depth 5: a narrow decoder keeps the tests fast
TARGET = "lymphnode.models.SmpUNet"
NET = {"_target_": TARGET, "encoder": "resnet18", "encoder_depth": 3,
       "decoder_channels": [32, 16, 8]}  # fmt: skip
CONTRACT = {"level": 0, "patch_size": SIZE, "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}


def small(encoder: str = "resnet18", **kwargs) -> SmpUNet:
    return SmpUNet(encoder=encoder, decoder_channels=SMALL, **kwargs)


def perturb(k: int) -> Callable:
    """A forward hook on ``net.encoder`` that replaces feature ``k`` of its output by noise (the
    deeper features, computed from the true one, stay as they are)."""

    def hook(module, inputs, output):
        output = list(output)
        g = torch.Generator().manual_seed(k)
        output[k] = torch.randn(output[k].shape, generator=g) * 10
        return output

    return hook


def run_perturbed(net: SmpUNet, x: torch.Tensor, k: int) -> UNetOutput:
    handle = net.encoder.register_forward_hook(perturb(k))
    try:
        return net(x)
    finally:
        handle.remove()


# --- shapes and padding -------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["resnet18", "tu-convnext_atto"])
def test_output_shapes_for_multiples_of_the_stride_and_other_sizes(encoder: str) -> None:
    net = small(encoder).eval()
    for h, w in [(SIZE, SIZE), (70, 50), (net.min_size, net.min_size + 1)]:
        out = net(torch.randn(2, 3, h, w))
        assert isinstance(out, UNetOutput)
        assert out.recon.shape == (2, 3, h, w) and out.seg.shape == (2, 1, h, w)
        assert torch.isfinite(out.recon).all() and torch.isfinite(out.seg).all()


def test_a_300px_patch_is_the_320px_reflect_padded_output_cropped() -> None:
    torch.manual_seed(0)
    net = small().eval()  # encoder_depth 5: 300 px is not a multiple of 32
    x = torch.randn(1, 3, 300, 300)
    padded = F.pad(x, (0, 20, 0, 20), mode="reflect")  # 320 x 320, bottom/right
    out, ref = net(x), net(padded)
    assert out.seg.shape == (1, 1, 300, 300)
    torch.testing.assert_close(out.seg, ref.seg[..., :300, :300], rtol=0, atol=0)
    torch.testing.assert_close(out.recon, ref.recon[..., :300, :300], rtol=0, atol=0)
    zero_padded = net(F.pad(x, (0, 20, 0, 20)))  # the padding mode matters: reflect, not zeros
    assert not torch.allclose(out.seg, zero_padded.seg[..., :300, :300])
    assert net.encode(x).shape == (1, 512, 10, 10)  # ceil(300 / 32)
    torch.testing.assert_close(net.encode(x), net.encoder(padded)[-1], rtol=0, atol=0)


def test_inputs_smaller_than_the_stride_or_with_other_channels_are_refused() -> None:
    net = small()
    with pytest.raises(ConfigError, match=r"31x40 px is smaller than the minimum 32 px .*depth=5"):
        net(torch.randn(1, 3, 31, 40))
    with pytest.raises(ConfigError, match=r"smaller than the minimum 32 px"):
        net.encode(torch.randn(1, 3, 40, 31))
    with pytest.raises(ConfigError, match=r"shape \(1, 1, 64, 64\); expected \(B, 3, H, W\)"):
        net(torch.randn(1, 1, SIZE, SIZE))


def test_with_top_skip_seg_equals_smps_own_unet_with_the_same_weights() -> None:
    torch.manual_seed(0)
    net = SmpUNet(encoder="resnet18", top_skip=True).eval()
    reference = smp.Unet("resnet18", encoder_weights=None, classes=1).eval()
    state = {
        k.replace("seg_head.", "segmentation_head.0."): v
        for k, v in net.state_dict().items()
        if not k.startswith("recon_head.")
    }
    reference.load_state_dict(state)  # strict: the same modules
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(net(x).seg, reference(x))


# --- the top skip -------------------------------------------------------------------------------


@pytest.mark.parametrize(("encoder", "top"), [("resnet18", 1), ("tu-convnext_atto", 2)])
def test_top_skip_false_zeroes_the_highest_skip_with_channels(encoder: str, top: int) -> None:
    torch.manual_seed(0)
    net = small(encoder, top_skip=False).eval()
    assert net.top_skip_index == top  # ConvNeXt's stride-2 feature is empty: its top is stride 4
    assert net.encoder.out_channels[top] > 0 and all(
        c == 0 for c in net.encoder.out_channels[1:top]
    )
    x = torch.randn(2, 3, SIZE, SIZE)
    base = net(x)
    same = run_perturbed(net, x, top)  # the top feature never reaches the decoder
    # equal up to float rounding: oneDNN may pick another kernel for a second identical call on
    # some CPUs (ConvNeXt's depthwise convs differed in the last bits on an AMD EPYC)
    torch.testing.assert_close(base.seg, same.seg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base.recon, same.recon, rtol=1e-5, atol=1e-6)
    deeper = run_perturbed(net, x, top + 1)  # the next skip does
    assert not torch.allclose(base.recon, deeper.recon)

    net.top_skip = True  # the same weights with the top skip: it matters, and the output changes
    assert not torch.allclose(net(x).seg, base.seg)
    assert not torch.allclose(run_perturbed(net, x, top).recon, net(x).recon)


def test_decoder_weights_on_the_top_skip_get_gradient_only_with_it() -> None:
    for top_skip in (True, False):
        torch.manual_seed(0)
        net = small(top_skip=top_skip)
        net(torch.randn(2, 3, SIZE, SIZE)).recon.square().sum().backward()
        # resnet18's top skip (feature 1, 64 channels) enters decoder block 3 (of 0..4, deepest
        # first), concatenated after the upsampled decoder tensor (SMALL[2] = 16 channels)
        weight = net.decoder.blocks[3].conv1[0].weight
        assert weight.shape == (SMALL[3], SMALL[2] + 64, 3, 3)
        assert bool((weight.grad[:, SMALL[2] :] != 0).any()) is top_skip
        assert (weight.grad[:, : SMALL[2]] != 0).any()
        assert (net.encoder.conv1.weight.grad != 0).any()  # the encoder still learns


def test_top_skip_changes_no_parameter_shape_and_prepare_transfer_keeps_everything() -> None:
    with_skip, without = small(top_skip=True), small(top_skip=False)
    shapes = {k: v.shape for k, v in with_skip.state_dict().items()}
    assert shapes == {k: v.shape for k, v in without.state_dict().items()}
    assert with_skip.prepare_transfer(without.config) == []


# --- encode, config, registry, arguments --------------------------------------------------------


@pytest.mark.parametrize(("encoder", "channels"), [("resnet18", 512), ("tu-convnext_atto", 320)])
def test_encode_is_the_deepest_feature_and_uses_only_encoder_parameters(
    encoder: str, channels: int
) -> None:
    torch.manual_seed(0)
    net = small(encoder).eval()
    assert net.encoder_channels == channels and net.encoder_prefix == "encoder."
    x = torch.randn(2, 3, SIZE, SIZE)
    z = net.encode(x)
    assert z.shape == (2, channels, 2, 2)  # 64 px / 32
    torch.testing.assert_close(z, net.encoder(x)[-1])
    z.square().sum().backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in net.named_parameters() if n.startswith("encoder.")}


def test_config_round_trips_through_the_registry() -> None:
    net = SmpUNet(encoder_depth=3, decoder_channels=[16, 8, 8], decoder_norm="identity")
    assert net.min_size == 8 and net.top_skip is False  # the paper's pretraining by default
    clone = build_network({"_target_": TARGET, **net.config})
    assert isinstance(clone, SmpUNet) and clone.config == net.config
    assert clone.config["decoder_norm"] == "identity"
    assert [p.shape for p in clone.parameters()] == [p.shape for p in net.parameters()]
    assert net(torch.randn(1, 3, 20, 28)).seg.shape == (1, 1, 20, 28)


def test_the_yaml_builds_the_paper_pretraining_network() -> None:
    config = OmegaConf.to_container(OmegaConf.load("conf/model/smp_unet.yaml"))
    net = build_network(config)
    assert isinstance(net, SmpUNet)
    assert net.config == {"encoder": "resnet18", "encoder_depth": 5, "encoder_weights": None,
                          "decoder_channels": [256, 128, 64, 32, 16],
                          "decoder_norm": "batchnorm", "in_channels": 3,
                          "top_skip": False}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoder": "resnet7"}, r"encoder='resnet7' .*not available in segmentation-models"),
        ({"encoder": "tu-convnext_nope"}, r"encoder='tu-convnext_nope' .*not available"),
        ({"encoder": ""}, r"encoder='' is invalid; expected an smp encoder name"),
        ({"encoder_depth": 6}, r"^SmpUNet: encoder_depth must be one of \[3, 4, 5\], got 6$"),
        ({"decoder_channels": [8, 8]}, r"decoder_channels=\[8, 8\] is invalid; expected 5"),
        ({"decoder_channels": [8, 8, 8, 8, 0]}, r"decoder_channels\[4\] must be an integer >= 1"),
        ({"decoder_norm": "layernorm"}, r"decoder_norm must be one of \['batchnorm', 'inst"),
        ({"top_skip": "no"}, r"top_skip='no' is invalid; expected true or false"),
        ({"in_channels": 0}, r"in_channels must be an integer >= 1, got 0"),
        ({"encoder_weights": 3}, r"encoder_weights=3 is invalid; expected null or the path"),
    ],
)
def test_invalid_arguments_are_rejected_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SmpUNet(**kwargs)


@pytest.mark.parametrize(
    ("norm", "kind"),
    [("batchnorm", torch.nn.BatchNorm2d), ("instancenorm", torch.nn.InstanceNorm2d),
     ("identity", None)],
)  # fmt: skip
def test_decoder_norm_sets_the_decoders_normalisation(norm: str, kind: type | None) -> None:
    net = SmpUNet(decoder_channels=SMALL, decoder_norm=norm, in_channels=1)
    norms = [
        m for m in net.decoder.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
    ]
    if kind is None:
        assert norms == []
    else:
        assert norms and all(type(m) is kind for m in norms)
        assert all(m.affine for m in norms)  # smp's own instancenorm is not affine
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.encoder.modules())  # untouched
    out = net(torch.randn(2, 1, SIZE, SIZE))
    assert out.recon.shape == (2, 1, SIZE, SIZE) and out.seg.shape == (2, 1, SIZE, SIZE)


def test_depth_groups_cover_every_parameter_once() -> None:
    net = small()
    groups = net.depth_groups()
    assert list(groups) == ["encoder", "dec4", "dec3", "dec2", "dec1", "dec0", "heads"]
    names = sorted(n for names in groups.values() for n in names)
    assert names == sorted(n for n, _ in net.named_parameters())
    assert all(n.startswith("decoder.blocks.4.") for n in groups["dec0"])  # full resolution
    assert sorted(groups["heads"]) == sorted(
        n for n, _ in net.named_parameters() if n.startswith(("seg_head.", "recon_head."))
    )


# --- encoder weight files -----------------------------------------------------------------------


def _resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()  # with fc.weight, fc.bias


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": {f"encoder.{k}": v for k, v in s.items()}},
        lambda s: {"model": s, "epoch": 3},
    ],
    ids=["bare", "state_dict-prefixed", "model"],
)
def test_a_torchvision_resnet18_file_loads_into_the_encoder(tmp_path, caplog, wrap) -> None:
    state = _resnet18_state()
    path = tmp_path / "r18.pt"
    torch.save(wrap(state), path)
    with caplog.at_level(logging.INFO, logger="lymphnode.models.smp_unet"):
        net = small(encoder_weights=path)
    assert "dropped classifier keys" in caplog.text and "fc.bias" in caplog.text
    encoder_state = net.encoder.state_dict()
    assert sorted(encoder_state) == sorted(k for k in state if not k.startswith("fc."))
    for name, value in encoder_state.items():
        assert torch.equal(value, state[name]), name
    assert net.config["encoder_weights"] == str(path)
    fresh = small().encoder
    dropped = load_encoder_weights(fresh, path)
    assert [k.removeprefix("encoder.") for k in dropped] == ["fc.bias", "fc.weight"]


def test_a_timm_convnext_file_loads_into_the_tu_encoder(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = timm.create_model("convnext_atto", pretrained=False).state_dict()  # stem.0.weight
    path = tmp_path / "convnext_atto.pt"
    torch.save(state, path)
    net = small("tu-convnext_atto", encoder_weights=str(path))
    encoder_state = net.encoder.state_dict()  # model.stem_0.weight, model.stages_0.blocks...
    assert len(encoder_state) == len([k for k in state if not k.startswith("head.")])
    assert torch.equal(encoder_state["model.stem_0.weight"], state["stem.0.weight"])
    assert torch.equal(
        encoder_state["model.stages_3.blocks.1.conv_dw.weight"],
        state["stages.3.blocks.1.conv_dw.weight"],
    )
    dropped = load_encoder_weights(small("tu-convnext_atto").encoder, path)
    assert dropped and all(k.startswith("head.") for k in dropped)


def test_a_file_of_another_encoder_is_refused_naming_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match=r"r34\.pt does not fit the encoder ResNetEncoder") as e:
        small(encoder_weights=path)
    # resnet34 has 8 more BasicBlocks than resnet18, 12 tensors each (two convs, two batch norms)
    assert "0 missing, 96 unexpected, 0 of another shape" in str(e.value)
    assert "unexpected layer1.2.conv1.weight" in str(e.value)
    assert "... 86 more" in str(e.value)  # the first ten and a count
    path = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(
        ConfigError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\) vs encoder \(64, 64, 3"
    ):
        small(encoder_weights=path)


def test_a_file_missing_a_tensor_is_refused_and_nothing_is_copied(tmp_path: Path) -> None:
    state = _resnet18_state()
    del state["layer4.1.bn2.running_var"]
    state["layer9.weight"] = torch.zeros(3)
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    encoder = small().encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(ConfigError, match=r"1 missing, 1 unexpected, 0 of another shape") as e:
        load_encoder_weights(encoder, path)
    assert "missing layer4.1.bn2.running_var" in str(e.value)
    assert "unexpected layer9.weight" in str(e.value)
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_missing_and_unreadable_weight_files_are_refused_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"encoder_weights=.*nope\.pt does not exist"):
        small(encoder_weights=tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ConfigError, match=r"text\.pt cannot be read as a torch weights file"):
        small(encoder_weights=tmp_path / "text.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"list\.pt holds a list that is not a state dict"):
        small(encoder_weights=tmp_path / "list.pt")


# --- through the task modules -------------------------------------------------------------------


def _step(module, batch) -> float:
    module.log = lambda *a, **k: None  # outside a trainer
    loss = module.training_step(batch, 0)
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize(
    "make",
    [ReconstructionModule, MaskedModule, StainModule, MultiTaskModule,
     lambda **k: ContrastiveModule(**k, hidden_dim=16, projection_dim=8),
     lambda **k: ContrastiveModule(**k, hidden_dim=16, projection_dim=8, dense_weight=0.5)],
    ids=["reconstruction", "masked", "stain", "multitask", "contrastive", "dense_contrastive"],
)  # fmt: skip
def test_every_task_trains_a_step_with_smp_unet(make: Callable) -> None:
    torch.manual_seed(0)
    module = make(net=NET, preprocess=CONTRACT)
    assert isinstance(module.net, SmpUNet)
    x = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    batch = {"image": x, "image2": x.flip(-1), "mask": (x[:, :1] > 0).float()}
    loss = _step(module, batch)
    assert loss > 0 and loss == loss  # finite, not NaN
    grad = module.net.encoder.conv1.weight.grad
    assert grad is not None and (grad != 0).any()


def test_pretrained_reconstruction_weights_transfer_into_a_multitask_smp_unet(
    tmp_path: Path,
) -> None:
    import pytorch_lightning as pl

    recon = ReconstructionModule(net=NET, preprocess=CONTRACT)
    assert _step(recon, {"image": torch.randn(4, 3, SIZE, SIZE)}) > 0
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(recon)
    ckpt = tmp_path / "recon.ckpt"
    trainer.save_checkpoint(ckpt)
    target = MultiTaskModule(net={**NET, "top_skip": True}, preprocess=CONTRACT)
    report = load_pretrained_weights(target.net, ckpt)
    assert not report.missing and not report.reinitialized  # top_skip changes no shape
    for name, value in recon.net.state_dict().items():
        assert torch.equal(target.net.state_dict()[name], value), name

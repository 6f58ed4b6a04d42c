"""ViT encoders by preset from local weight files, and the ViTUNet built on them.

Every preset is tested with a tiny randomly initialised model that keeps its quirks (register
tokens, SwiGLU, layer scale, patch size, position embeddings with or without the prefix tokens):
the reference is built here with timm directly from the kwargs the model's authors publish, its
weights are saved in the preset's layout (timm's, or Hugging Face's for Phikon-v2, converted here
independently of lymphnode's mapping), and the preset must load them strictly and give the same
features.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn

from lymphnode.core.errors import ConfigError
from lymphnode.models import ViTUNet
from lymphnode.models.registry import build_network
from lymphnode.models.vit_presets import PRESETS, preset, timm_kwargs
from lymphnode.models.vit_weights import hf_to_timm, load_vit_weights

torch.set_num_threads(1)

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 3}  # 48 * 5.3375 -> an even SwiGLU width
DECODER = [16, 8, 8]  # two token levels at depth 2, then the full-resolution block
SILU = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}
# What each model's authors publish for timm.create_model (model cards / config.json), written out
# here on purpose rather than read from lymphnode.models.vit_presets: architecture, kwargs.
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5}),
    "uni2_h": (
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            **SILU,
        },
    ),
    "virchow2": (
        "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, **SILU},
    ),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5}),
    "h_optimus_1": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5}),
    "prov_gigapath": (
        "vit_giant_patch14_dinov2",
        {
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
        },
    ),
    "phikon_v2": (
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5},
    ),
}
# the quirk each tiny model must keep: (patch, register tokens, pos. embedding covers the prefix,
# MLP class, layer scale)
QUIRKS = {
    "uni": (16, 0, True, "Mlp", True),
    "uni2_h": (14, 8, False, "GluMlp", True),
    "virchow2": (14, 4, True, "GluMlp", True),
    "h_optimus_0": (14, 4, False, "GluMlp", True),
    "h_optimus_1": (14, 4, False, "GluMlp", True),
    "prov_gigapath": (16, 0, True, "GluMlp", True),
    "phikon_v2": (16, 0, True, "Mlp", True),
}


def reference(name: str, seed: int = 0) -> nn.Module:
    """timm's own tiny model of preset ``name``, randomly initialised (layer scale and biases
    randomised too, so that a wrongly mapped tensor cannot hide behind a constant)."""
    arch, kwargs = PUBLISHED[name]
    torch.manual_seed(seed)
    model = timm.create_model(
        arch, pretrained=False, num_classes=0, dynamic_img_size=True, **{**kwargs, **TINY}
    )
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model.eval()


def to_hf_dinov2(state: dict[str, torch.Tensor], version: int = 4) -> dict[str, torch.Tensor]:
    """A timm ViT state dict with transformers' Dinov2Model names (what Phikon-v2 ships: version
    4; transformers 5 renamed the attention to q/k/v/o_proj), plus the mask token Dinov2Model has
    and timm does not. Checked against real Dinov2Model files of transformers 4.57 and 5.25."""
    out: dict[str, torch.Tensor] = {}
    attention_out = "attention.output.dense" if version == 4 else "attention.o_proj"
    qkv = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    if version == 5:
        qkv = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    block_names = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": attention_out,
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for key, value in state.items():
        if key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif key.startswith("patch_embed.proj."):
            out[f"embeddings.patch_embeddings.projection.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("norm."):
            out[f"layernorm.{key.rsplit('.', 1)[1]}"] = value
        else:
            _, index, rest = key.split(".", 2)
            layer = f"encoder.layer.{index}"
            if rest.startswith("attn.qkv."):
                leaf = rest.rsplit(".", 1)[1]
                for part, chunk in zip(qkv, value.chunk(3, dim=0), strict=True):
                    out[f"{layer}.{part}.{leaf}"] = chunk.clone()
            elif rest in ("ls1.gamma", "ls2.gamma"):
                out[f"{layer}.layer_scale{rest[2]}.lambda1"] = value
            else:
                module, leaf = rest.rsplit(".", 1)
                out[f"{layer}.{block_names[module]}.{leaf}"] = value
    out["embeddings.mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return out


def save_in_layout(name: str, model: nn.Module, tmp_path: Path, fmt: str = "bin") -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if PRESETS[name].layout == "hf_dinov2":
        state = to_hf_dinov2(state)
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def tiny(name: str = "uni", **kwargs: Any) -> ViTUNet:
    return ViTUNet(name, vit_kwargs=TINY, decoder_channels=DECODER, **kwargs)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_preset_loads_its_layout_strictly_and_matches_timm(name: str, tmp_path: Path) -> None:
    ref = reference(name)
    fmt = "safetensors" if name in ("phikon_v2", "virchow2") else "bin"
    path = save_in_layout(name, ref, tmp_path, fmt)
    net = tiny(name, weights=path).eval()
    patch, regs, embed_prefix, mlp, layer_scale = QUIRKS[name]
    vit = net.encoder
    assert net.patch_size == patch and vit.num_reg_tokens == regs
    assert vit.no_embed_class is not embed_prefix and type(vit.blocks[0].mlp).__name__ == mlp
    assert hasattr(vit.blocks[0].ls1, "gamma") is layer_scale
    assert net.mean == PRESETS[name].mean and net.mpp == 0.5
    x = torch.randn(2, 3, 3 * patch, 2 * patch)  # not the 224 px the position embedding holds
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), ref.forward_features(x))
        grid = net.encode(x)
    assert grid.shape == (2, TINY["embed_dim"], 3, 2)


def test_phikon_v2_also_loads_transformers_5_names(tmp_path: Path) -> None:
    ref = reference("phikon_v2", seed=3)
    path = tmp_path / "phikon_v5.safetensors"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(to_hf_dinov2(state, version=5), str(path))
    net = tiny("phikon_v2", weights=path).eval()
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        assert torch.equal(net.encoder.forward_features(x), ref.forward_features(x))


def test_a_timm_preset_takes_any_vit_by_arch_with_timms_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, depth=2, dynamic_img_size=True
    )
    path = tmp_path / "vits.pth"
    torch.save({"state_dict": {**ref.state_dict(), "head.weight": torch.zeros(3, 384)}}, path)
    net = ViTUNet(
        "timm", arch="vit_small_patch16_224", depth=2, weights=path, decoder_channels=DECODER
    )
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(net.encoder.eval().forward_features(x), ref.eval().forward_features(x))
    assert net.mean == tuple(ref.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)  # timm's augreg config
    assert net.mpp is None
    with pytest.raises(ConfigError, match=r"model.preset=timm needs model.arch"):
        ViTUNet("timm")
    with pytest.raises(ConfigError, match=r"model.arch='nope_vit' is not a timm model name"):
        ViTUNet("timm", arch="nope_vit")
    with pytest.raises(ConfigError, match=r"model.arch=.resnet18. is not a timm VisionTransformer"):
        ViTUNet("timm", arch="resnet18")
    with pytest.raises(ConfigError, match=r"model.arch='vit_small_patch16_224' cannot be combined"):
        ViTUNet("uni", arch="vit_small_patch16_224")


def test_the_wrong_preset_is_refused_naming_file_preset_and_keys(tmp_path: Path) -> None:
    path = save_in_layout("uni", reference("uni"), tmp_path)
    with pytest.raises(ConfigError) as err:
        tiny("virchow2", weights=path)
    message = str(err.value)
    assert message.startswith(f"weights={path} does not fit model.preset=virchow2")
    assert "unexpected" in message or "missing" in message
    assert "patch_embed.proj.weight: file (48, 3, 16, 16) vs model (48, 3, 14, 14)" in message
    assert "missing reg_token" in message  # UNI has no register tokens, Virchow2 four
    # a Hugging Face preset also takes timm's names (the same ViT-L/16 as UNI here), and says
    # which layout it expects when the file fits neither
    assert tiny("phikon_v2", weights=path).encoder.num_reg_tokens == 0
    giant = save_in_layout("uni2_h", reference("uni2_h"), tmp_path)
    with pytest.raises(
        ConfigError, match=r"looks like a timm file, this preset expects the hf_dinov2"
    ):
        tiny("phikon_v2", weights=giant)
    hf_path = save_in_layout("phikon_v2", reference("phikon_v2"), tmp_path)
    with pytest.raises(ConfigError, match=r"looks like a Hugging Face transformers file"):
        tiny("uni", weights=hf_path)


def test_a_file_missing_a_tensor_is_refused_and_nothing_is_copied(tmp_path: Path) -> None:
    state = reference("h_optimus_0").state_dict()
    del state["blocks.1.ls2.gamma"]
    state["blocks.1.extra.weight"] = torch.zeros(2)
    path = tmp_path / "h0.bin"
    torch.save(state, path)
    net = tiny("h_optimus_0")
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    with pytest.raises(ConfigError, match=r"1 missing, 1 unexpected, 0 of another shape") as err:
        load_vit_weights(net.encoder, path, preset="h_optimus_0")
    assert "unexpected blocks.1.extra.weight" in str(err.value)
    assert "missing blocks.1.ls2.gamma" in str(err.value)
    for name, value in net.encoder.state_dict().items():
        assert torch.equal(value, before[name]), name


class _Payload:
    """A pickle that would create a file when unpickled (what weights_only=True must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_pickle_payloads_missing_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    with path.open("wb") as f:
        pickle.dump({"cls_token": _Payload(marker)}, f, protocol=2)  # torch.load's own
    with pytest.raises(
        ConfigError,
        match=r"evil\.bin cannot be read as a torch weights file with weights_only=True",
    ):
        tiny("uni", weights=path)
    assert not marker.exists()  # the payload never ran
    with pytest.raises(ConfigError, match=r"weights=.*nope\.bin does not exist \(expected a local"):
        tiny("uni", weights=tmp_path / "nope.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"bad\.safetensors cannot be read as a safetensors file"):
        tiny("uni", weights=tmp_path / "bad.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"list\.pt holds a list that is not a state dict"):
        tiny("uni", weights=tmp_path / "list.pt")


def test_building_and_loading_never_touch_the_network(tmp_path: Path, monkeypatch) -> None:
    path = save_in_layout("uni2_h", reference("uni2_h"), tmp_path, "safetensors")
    seen: list[str | None] = []
    real_create = timm.create_model

    def create(*args: Any, **kwargs: Any) -> nn.Module:
        seen.append(os.environ.get("HF_HUB_OFFLINE"))
        assert kwargs.get("pretrained") is False
        return real_create(*args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access: {args!r}")

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    net = tiny("uni2_h", weights=path)
    assert seen == ["1"] and "HF_HUB_OFFLINE" not in os.environ  # set while building, restored
    assert net(torch.randn(1, 3, 28, 28)).seg.shape == (1, 1, 28, 28)


@pytest.mark.parametrize(("name", "size"), [("uni", (32, 48)), ("virchow2", (42, 28))])
def test_the_output_has_the_input_size_and_other_sizes_are_refused(
    name: str, size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    net = tiny(name)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = net(x)
    assert out.seg.shape == (2, 1, *size) and out.recon is not None
    assert out.recon.shape == (2, 3, *size)
    out.seg.mean().backward()
    assert net.encoder.patch_embed.proj.weight.grad is not None  # the encoder trains too
    p = net.patch_size
    with pytest.raises(
        ConfigError, match=rf"input of {p + 2}x{2 * p} px: preset '{name}' has patch size {p} px"
    ):
        net(torch.randn(1, 3, p + 2, 2 * p))
    with pytest.raises(ConfigError, match=r"expected \(B, 3, H, W\)"):
        net(torch.randn(1, 1, p, p))


def test_the_reconstruction_head_is_optional_and_the_image_skip_feeds_the_output() -> None:
    torch.manual_seed(0)
    net = tiny("uni", recon=False).eval()
    assert net.recon_head is None and not any(k.startswith("recon_head") for k in net.state_dict())
    x = torch.randn(1, 3, 32, 32)
    out = net(x)
    assert out.recon is None and out.seg.shape == (1, 1, 32, 32)
    assert net.prepare_transfer({"recon": True}) == ["recon_head."]
    assert net.prepare_transfer({"recon": False}) == []
    blind = tiny("uni", recon=False, top_skip=False).eval()
    blind.load_state_dict(net.state_dict())  # the same parameters: the skip changes no shape
    with torch.no_grad():
        assert not torch.allclose(blind(x).seg, out.seg)  # the image reached the output
        bumped = x.clone()
        bumped[..., 0, 0] += 5.0  # one pixel: with the skip, its own logit changes most
        delta = (net(bumped).seg - out.seg).abs()[0, 0]
    assert delta[0, 0] == delta.max() and delta[0, 0] > 0


def test_reduced_depth_drops_the_deeper_blocks_only_when_asked(tmp_path: Path) -> None:
    path = save_in_layout("prov_gigapath", reference("prov_gigapath"), tmp_path)
    shallow = ViTUNet(
        "prov_gigapath", weights=path, depth=1, vit_kwargs=TINY, decoder_channels=[8, 8]
    )
    ref = reference("prov_gigapath")
    assert len(shallow.encoder.blocks) == 1 and shallow.feature_blocks == [0]
    assert torch.equal(shallow.encoder.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    small = {**TINY, "depth": 1}
    with pytest.raises(
        ConfigError, match=r"(?s)0 missing, 14 unexpected.*unexpected blocks\.1\.norm1"
    ):
        ViTUNet("prov_gigapath", weights=path, vit_kwargs=small, decoder_channels=[8, 8])
    with pytest.raises(
        ConfigError, match=r"depth=3 is more than the 2 blocks of preset 'prov_gigapath'"
    ):
        ViTUNet("prov_gigapath", depth=3, vit_kwargs=TINY)
    with pytest.raises(ConfigError, match=r"depth=41 is more than the 40 blocks"):
        ViTUNet("prov_gigapath", depth=41)


def test_config_rebuilds_the_network_by_target() -> None:
    net = tiny("h_optimus_1", feature_blocks=[0, 1])
    config = {"_target_": "lymphnode.models.ViTUNet", **net.config}
    again = build_network(config)
    assert isinstance(again, ViTUNet) and again.config == net.config
    assert sorted(again.state_dict()) == sorted(net.state_dict())
    assert set(net.depth_groups()) == {"encoder", "dec2", "dec1", "dec0", "heads"}
    assert net.encoder_channels == 48 and net.min_size == net.size_multiple == 14


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"preset": "uni3"},
            r"model.preset='uni3' is not a ViT preset; expected one of uni, uni2_h",
        ),
        ({"vit_kwargs": {"block_fn": "x"}}, r"'block_fn' cannot be set for preset 'uni'"),
        ({"vit_kwargs": {"mlp_layer": "os.system"}}, r"mlp_layer='os.system' is invalid"),
        ({"vit_kwargs": {"act_layer": "tanh"}}, r"act_layer='tanh' is invalid"),
        ({"vit_kwargs": {"embed_dim": {"a": 1}}}, r"vit_kwargs.embed_dim=\{'a': 1\} is not plain"),
        ({"feature_blocks": [1, 0]}, r"feature_blocks=\[1, 0\] is invalid; expected increasing"),
        ({"feature_blocks": [0, 5]}, r"feature_blocks=\[0, 5\] is invalid"),
        ({"decoder_channels": [8, 8]}, r"decoder_channels=\[8, 8\] is invalid; expected 3"),
        ({"decoder_norm": "layer"}, r"decoder_norm"),
        ({"recon": "yes"}, r"recon='yes' is invalid; expected true or false"),
        ({"weights": 3}, r"weights=3 is invalid"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict[str, Any], message: str) -> None:
    args = {"preset": "uni", "vit_kwargs": TINY, "decoder_channels": DECODER, **kwargs}
    if "vit_kwargs" in kwargs:
        args["vit_kwargs"] = {**TINY, **kwargs["vit_kwargs"]}
    with pytest.raises(ConfigError, match=message):
        ViTUNet(**args)


def test_presets_hold_published_facts() -> None:
    assert set(PRESETS) == {*PUBLISHED, "timm"}
    for name, (arch, kwargs) in PUBLISHED.items():
        p = preset(name)
        assert p.arch == arch and p.source.startswith("https://huggingface.co/") and p.licence
        built = timm_kwargs(p)
        assert built["dynamic_img_size"] is True and built["num_classes"] == 0
        for key, value in kwargs.items():
            assert built[key] == value, (name, key)
    assert preset("h_optimus_0").mean == (0.707223, 0.578729, 0.703617)
    assert preset("phikon_v2").layout == "hf_dinov2" and not preset("phikon_v2").gated


def test_hf_names_map_to_timms_and_unknown_keys_stay() -> None:
    q, k, v = torch.ones(4, 4), 2 * torch.ones(4, 4), 3 * torch.ones(4, 4)
    state = {
        "dinov2.encoder.layer.0.attention.attention.query.weight": q,
        "dinov2.encoder.layer.0.attention.attention.key.weight": k,
        "dinov2.encoder.layer.0.attention.attention.value.weight": v,
        "encoder.layer.1.attention.attention.query.bias": torch.zeros(4),  # no key/value: kept
        "encoder.layer.0.mlp.weights_in.weight": torch.zeros(8, 4),
        "encoder.layer.0.layer_scale2.lambda1": torch.zeros(4),
        "classifier.weight": torch.zeros(2, 4),
        "embeddings.mask_token": torch.zeros(1, 4),
        "something.else": torch.zeros(1),
    }
    out, dropped = hf_to_timm(state, "hf_dinov2")
    assert torch.equal(out["blocks.0.attn.qkv.weight"], torch.cat([q, k, v]))
    assert "blocks.0.mlp.fc1.weight" in out and "blocks.0.ls2.gamma" in out
    assert "encoder.layer.1.attention.attention.query.bias" in out and "something.else" in out
    assert sorted(dropped) == ["classifier.weight", "embeddings.mask_token"]
    vit, _ = hf_to_timm(
        {
            "vit.encoder.layer.3.intermediate.dense.bias": torch.zeros(2),
            "pooler.dense.weight": torch.zeros(2, 2),
        },
        "hf_vit",
    )
    assert list(vit) == ["blocks.3.mlp.fc1.bias"]
    gate, up = torch.ones(3, 4), 2 * torch.ones(3, 4)
    v5, _ = hf_to_timm(
        {
            "encoder.layer.2.mlp.gate_proj.weight": gate,
            "encoder.layer.2.mlp.up_proj.weight": up,
            "encoder.layer.2.mlp.down_proj.weight": torch.zeros(4, 3),
            "encoder.layer.2.attention.o_proj.bias": torch.zeros(4),
        },
        "hf_dinov2",
    )
    assert torch.equal(v5["blocks.2.mlp.fc1.weight"], torch.cat([gate, up]))  # silu(gate) * up
    assert sorted(v5) == [
        "blocks.2.attn.proj.bias",
        "blocks.2.mlp.fc1.weight",
        "blocks.2.mlp.fc2.weight",
    ]
    vit5, _ = hf_to_timm({"layers.0.layernorm_before.weight": torch.zeros(2)}, "hf_vit")
    assert list(vit5) == ["blocks.0.norm1.weight"]


# --- through the task modules (the contract they probe today) -----------------------------------

VIT_NET = {"_target_": "lymphnode.models.ViTUNet", "preset": "uni", "vit_kwargs": TINY,
           "decoder_channels": DECODER}  # fmt: skip
CONTRACT = {"level": 0, "patch_size": 64, "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}


@pytest.mark.parametrize(
    "task",
    ["reconstruction", "masked", "stain", "multitask", "contrastive", "dense_contrastive"],
)
def test_every_task_trains_a_step_with_the_vit(task: str) -> None:
    from lymphnode import tasks

    makers = {
        "reconstruction": tasks.ReconstructionModule,
        "masked": tasks.MaskedModule,
        "stain": tasks.StainModule,
        "multitask": tasks.MultiTaskModule,
        "contrastive": lambda **k: tasks.ContrastiveModule(**k, hidden_dim=16, projection_dim=8),
        "dense_contrastive": lambda **k: tasks.ContrastiveModule(
            **k, hidden_dim=16, projection_dim=8, dense_weight=0.5
        ),
    }
    torch.manual_seed(0)
    module = makers[task](net=VIT_NET, preprocess=CONTRACT)
    assert isinstance(module.net, ViTUNet)
    module.log = lambda *a, **k: None  # outside a trainer
    x = torch.rand(2, 3, 64, 64) * 2 - 1  # a few of the masked pretext's 32 px blocks
    batch = {"image": x, "image2": x.flip(-1), "mask": (x[:, :1] > 0).float()}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert float(loss.detach()) > 0 and loss == loss  # finite, not NaN
    grad = module.net.encoder.patch_embed.proj.weight.grad
    assert grad is not None and (grad != 0).any()


# (million parameters as published, its rounding): model cards / papers
PUBLISHED_SIZES = {
    "uni": (303.4, 0.05),  # ViT-L/16
    "uni2_h": (681, 0.5),  # model card: 681M
    "virchow2": (632, 1),  # paper: 632M
    "h_optimus_0": (1100, 50),  # model card: 1.1B
    "h_optimus_1": (1100, 50),
    "prov_gigapath": (1130, 5),  # paper: 1.13B (tile encoder)
    "phikon_v2": (303, 1),  # ViT-L
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_full_size_presets_have_the_published_parameter_counts(name: str) -> None:
    from lymphnode.models.vit_presets import build_vit

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        vit = build_vit(preset(name))
    millions = sum(p.numel() for p in vit.parameters()) / 1e6
    published, rounding = PUBLISHED_SIZES[name]
    assert abs(millions - published) <= rounding, millions


def test_model_vit_composes_with_the_demo_profile_and_the_command_line() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            demo = compose("train", overrides=["experiment=finetune", "profile=demo", "model=vit"])
            full = compose(
                "train",
                overrides=[
                    "experiment=finetune",
                    "model=vit",
                    "model.preset=virchow2",
                    "model.weights=/data/Virchow2.bin",
                    "model.depth=2",
                ],
            )
    finally:
        GlobalHydra.instance().clear()
    assert demo.model.vit_kwargs.embed_dim == 96 and demo.model.preset == "uni"
    net = instantiate(demo.model)  # builds: a tiny random ViT with UNI's quirks
    assert isinstance(net, ViTUNet) and len(net.encoder.blocks) == 4
    assert net(torch.randn(1, 3, 128, 128)).seg.shape == (1, 1, 128, 128)  # the demo's patches
    assert full.model.preset == "virchow2" and full.model.depth == 2
    assert full.model.weights == "/data/Virchow2.bin" and full.model.vit_kwargs is None

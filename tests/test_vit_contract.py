"""The proposed network contract (lymphnode.models.contract): the three networks implement it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lymphnode.models import SmpUNet, UNet, ViTUNet
from lymphnode.models.contract import (
    DeclaresInputNeeds,
    InputNeeds,
    SegmentationNetwork,
    missing_members,
)

torch.set_num_threads(1)


def networks() -> dict[str, nn.Module]:
    return {
        "unet": UNet(base_width=4, depth=2),
        "smp_unet": SmpUNet(encoder_depth=3, decoder_channels=[8, 8, 8]),
        "vit": ViTUNet(
            "virchow2", vit_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 3}, recon=False
        ),
    }


def test_every_network_implements_the_contract() -> None:
    for name, net in networks().items():
        assert missing_members(net) == [], name
        assert isinstance(net, SegmentationNetwork), name
        x = torch.randn(1, net.in_channels, 28, 28)  # 28: Virchow2's patch 14 divides it
        out = net.eval()(x)
        assert out.seg.shape == (1, 1, 28, 28), name
        assert (out.recon is None) is (net.recon_head is None), name
        assert net.encode(x).shape[1] == net.encoder_channels, name
        assert set(net.depth_groups()) >= {"heads"}, name


def test_only_the_vit_declares_its_input_needs() -> None:
    nets = networks()
    assert not isinstance(nets["unet"], DeclaresInputNeeds)
    vit = nets["vit"]
    assert isinstance(vit, DeclaresInputNeeds)
    assert vit.input_needs() == InputNeeds(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), mpp=0.5, size_multiple=14
    )


@pytest.mark.parametrize("module", [nn.Conv2d(3, 1, 1), nn.Identity()])
def test_a_plain_module_lacks_the_contract_by_name(module: nn.Module) -> None:
    missing = missing_members(module)
    assert "encode" in missing and "encoder_prefix" in missing and "config" in missing
    assert not isinstance(module, SegmentationNetwork)

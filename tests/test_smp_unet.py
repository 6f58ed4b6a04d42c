"""model=smp_unet: segmentation-models-pytorch's UNet with lymphnode's heads, local weights only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from lymphnode.core.errors import ConfigError
from lymphnode.models import SmpUNet
from lymphnode.models.checkpoint import load_pretrained_weights
from lymphnode.tasks import ContrastiveModule, MultiTaskModule, ReconstructionModule

NET = {"_target_": "lymphnode.models.SmpUNet", "encoder": "resnet18", "encoder_depth": 3,
       "decoder_channels": [32, 16, 8]}  # fmt: skip
CONTRACT = {"level": 0, "patch_size": 64, "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}


def test_outputs_encode_and_sizes() -> None:
    net = SmpUNet(encoder="resnet18", encoder_depth=3, decoder_channels=[32, 16, 8]).eval()
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert out.recon.shape == (2, 3, 64, 64) and out.seg.shape == (2, 1, 64, 64)
    assert net.encode(x).shape == (2, net.encoder_channels, 8, 8) == (2, 128, 8, 8)
    with pytest.raises(ConfigError, match="multiples of 8"):
        net(torch.randn(1, 3, 60, 64))


def test_top_skip_false_ignores_the_half_resolution_skip() -> None:
    for top_skip in (False, True):
        torch.manual_seed(0)
        net = SmpUNet(encoder_depth=3, decoder_channels=[32, 16, 8], top_skip=top_skip).eval()
        x = torch.randn(1, 3, 64, 64)
        base = net(x).seg
        encode = net.encoder.forward

        def other_skip(inputs: torch.Tensor, encode=encode) -> list[torch.Tensor]:
            features = list(encode(inputs))  # deeper stages already computed from the true one
            features[1] = torch.randn_like(features[1])  # only the skip path sees this
            return features

        net.encoder.forward = other_skip  # type: ignore[method-assign]
        changed = not torch.allclose(net(x).seg, base)
        assert changed is top_skip  # False: the 1/2-resolution skip never reaches the decoder


def test_local_encoder_weights_load_and_a_foreign_file_is_refused(tmp_path: Path) -> None:
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)  # with fc.* (dropped)
    net = SmpUNet(encoder="resnet18", encoder_weights=str(path))
    assert torch.equal(net.encoder.conv1.weight, resnet.conv1.weight)
    assert torch.equal(net.encoder.layer4[1].bn2.running_var, resnet.layer4[1].bn2.running_var)
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ConfigError, match=r"(?s)does not fit the encoder .*unexpected layer1\.2"):
        SmpUNet(encoder="resnet18", encoder_weights=str(wrong))
    with pytest.raises(ConfigError, match="does not exist"):
        SmpUNet(encoder_weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ConfigError, match="not available in segmentation-models-pytorch"):
        SmpUNet(encoder="resnet7")


def _step(module, batch) -> float:
    module.log = lambda *a, **k: None  # outside a trainer
    loss = module.training_step(batch, 0)
    loss.backward()
    return float(loss)


def test_every_task_trains_it_and_pretrained_weights_transfer(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    x = torch.randn(4, 3, 64, 64)
    mask = (torch.rand(4, 1, 64, 64) > 0.5).float()
    fine = MultiTaskModule(net=NET, preprocess=CONTRACT)
    assert _step(fine, {"image": x, "mask": mask}) > 0
    simclr = ContrastiveModule(net=NET, preprocess=CONTRACT, hidden_dim=16, projection_dim=8)
    assert _step(simclr, {"image": x, "image2": x.flip(-1)}) > 0
    recon = ReconstructionModule(net=NET, preprocess=CONTRACT)
    assert _step(recon, {"image": x}) > 0
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(recon)
    ckpt = tmp_path / "recon.ckpt"
    trainer.save_checkpoint(ckpt)
    target = MultiTaskModule(net=NET, preprocess=CONTRACT)
    report = load_pretrained_weights(target.net, ckpt)
    assert not report.missing and not report.reinitialized  # top_skip changes no shape
    for name, value in recon.net.state_dict().items():
        assert torch.equal(target.net.state_dict()[name], value), name

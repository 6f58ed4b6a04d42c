"""UNet: output size for any input, the removable top skip, parameter names and counts."""

from __future__ import annotations

import pytest
import torch

from lymphnode.core.errors import ConfigError
from lymphnode.models import UNet, UNetOutput, build_unet


def _double_conv_params(cin: int, cout: int) -> int:
    return 9 * cin * cout + 9 * cout * cout + 2 * 2 * cout  # two bias-free convs, two affine norms


def _expected_params(in_ch: int, base: int, depth: int, top_skip: bool, up: str) -> int:
    widths = [base * 2**d for d in range(depth + 1)]
    total = _double_conv_params(in_ch, widths[0])
    total += sum(_double_conv_params(widths[d - 1], widths[d]) for d in range(1, depth + 1))
    for d in range(depth):
        up_params = (4 if up == "transpose" else 1) * widths[d + 1] * widths[d] + widths[d]
        decoder_in = widths[d] * (2 if d > 0 or top_skip else 1)
        total += up_params + _double_conv_params(decoder_in, widths[d])
    total += widths[0] * in_ch + in_ch + widths[0] + 1  # 1x1 heads with bias
    return total


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
@pytest.mark.parametrize("top_skip", [True, False])
def test_output_size_equals_input_size_for_odd_and_paper_sizes(up, norm, top_skip):
    net = UNet(base_width=4, depth=3, norm=norm, up=up, top_skip=top_skip)
    for h, w in [(33, 33), (300, 300), (64, 47), (net.min_size, net.min_size + 1)]:
        out = net(torch.randn(2, 3, h, w))
        assert isinstance(out, UNetOutput)
        assert out.recon.shape == (2, 3, h, w)
        assert out.seg.shape == (2, 1, h, w)
        assert torch.isfinite(out.recon).all() and torch.isfinite(out.seg).all()


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
@pytest.mark.parametrize("top_skip", [True, False])
@pytest.mark.parametrize(("base", "depth"), [(4, 2), (6, 3)])
def test_parameter_count_matches_the_architecture(up, top_skip, base, depth):
    net = UNet(base_width=base, depth=depth, up=up, top_skip=top_skip)
    assert sum(p.numel() for p in net.parameters()) == _expected_params(
        3, base, depth, top_skip, up
    )


def test_default_unet_has_the_original_31_million_parameters():
    count = sum(p.numel() for p in UNet().parameters())
    assert 30.9e6 < count < 31.1e6  # Ronneberger's UNet (64 wide, depth 4, transposed convs)


def test_removing_the_top_skip_narrows_the_top_decoder_block():
    with_skip = UNet(base_width=4, depth=2, top_skip=True)
    without = UNet(base_width=4, depth=2, top_skip=False)
    assert with_skip.decoder[0][0].in_channels == 8
    assert without.decoder[0][0].in_channels == 4
    assert without.decoder[1][0].in_channels == with_skip.decoder[1][0].in_channels == 16


def _replace_skip(net: UNet, depth: int, calls: list[int]):
    """Forward hook: replace the skip tensor at `depth` (only the skip path) by noise."""

    def hook(module, inputs, output):
        calls.append(depth)
        return torch.randn_like(output) * 10

    return net.skips[depth].register_forward_hook(hook)


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
def test_without_top_skip_the_output_is_independent_of_the_top_skip_path(up):
    torch.manual_seed(0)
    net = UNet(base_width=4, depth=2, up=up, top_skip=False).eval()
    x = torch.randn(2, 3, 33, 33)
    reference = net(x)
    calls: list[int] = []
    handle = _replace_skip(net, 0, calls)
    perturbed = net(x)
    handle.remove()
    assert calls == []  # the top skip never reaches the decoder
    assert torch.equal(reference.recon, perturbed.recon)
    assert torch.equal(reference.seg, perturbed.seg)
    # the deeper skip is still used: perturbing it changes the output
    handle = _replace_skip(net, 1, calls)
    deeper = net(x)
    handle.remove()
    assert calls == [1]
    assert not torch.allclose(reference.recon, deeper.recon)


def test_with_top_skip_the_output_depends_on_the_top_skip_path():
    torch.manual_seed(0)
    net = UNet(base_width=4, depth=2, top_skip=True).eval()
    x = torch.randn(2, 3, 33, 33)
    reference = net(x)
    calls: list[int] = []
    handle = _replace_skip(net, 0, calls)
    perturbed = net(x)
    handle.remove()
    assert calls == [0]
    assert not torch.allclose(reference.recon, perturbed.recon)
    assert not torch.allclose(reference.seg, perturbed.seg)


def test_without_top_skip_no_gradient_flows_from_output_to_input_except_through_pooling():
    """The top encoder output reaches the decoder only through max pooling: pixels that are not
    the max of their 2x2 window get zero gradient from the output."""
    torch.manual_seed(0)
    net = UNet(base_width=4, depth=2, top_skip=False).eval()
    captured = {}
    net.encoder[0].register_forward_hook(
        lambda m, i, o: captured.__setitem__("top", o.retain_grad() or o)
    )
    out = net(torch.randn(1, 3, 32, 32))
    out.recon.sum().backward()
    grad = captured["top"].grad  # (1, 4, 32, 32)
    nonzero_per_window = (grad != 0).reshape(1, 4, 16, 2, 16, 2).sum(dim=(3, 5))
    assert int(nonzero_per_window.max()) <= 1  # at most the pooled pixel of each window

    with_skip = UNet(base_width=4, depth=2, top_skip=True).eval()
    with_skip.encoder[0].register_forward_hook(
        lambda m, i, o: captured.__setitem__("top", o.retain_grad() or o)
    )
    with_skip(torch.randn(1, 3, 32, 32)).recon.sum().backward()
    nonzero = (captured["top"].grad != 0).reshape(1, 4, 16, 2, 16, 2).sum(dim=(3, 5))
    assert int(nonzero.max()) > 1


def test_depth_groups_cover_every_parameter_once():
    net = UNet(base_width=4, depth=3)
    groups = net.depth_groups()
    assert list(groups) == ["enc0", "enc1", "enc2", "enc3", "dec0", "dec1", "dec2", "heads"]
    names = [n for names in groups.values() for n in names]
    assert sorted(names) == sorted(n for n, _ in net.named_parameters())
    assert all(n.startswith(("up.2.", "decoder.2.")) for n in groups["dec2"])


def test_reset_top_decoder_changes_only_the_top_decoder_block():
    torch.manual_seed(0)
    net = UNet(base_width=4, depth=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.decoder[0][1].weight.fill_(3.0)  # a norm scale; reset brings it back to 1
    names = net.reset_top_decoder()
    assert names and all(n.startswith("decoder.0.") for n in names)
    after = net.state_dict()
    for key in before:
        if key.startswith("decoder.0.") and key.endswith("0.weight"):
            assert not torch.equal(before[key], after[key]), key
        elif not key.startswith("decoder.0."):
            assert torch.equal(before[key], after[key]), key
    assert torch.equal(net.decoder[0][1].weight, torch.ones(4))


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    net = UNet(base_width=4, depth=2, up="bilinear").eval()
    x = torch.randn(2, 3, 33, 33)
    reference = net(x)
    net = net.to(memory_format=torch.channels_last)
    out = net(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out.recon, reference.recon, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.seg, reference.seg, rtol=1e-4, atol=1e-5)


def test_config_round_trips_through_build_unet():
    net = UNet(in_channels=3, base_width=5, depth=2, norm="group", up="bilinear", top_skip=False)
    clone = build_unet(net.config)
    assert clone.config == net.config
    assert [p.shape for p in clone.parameters()] == [p.shape for p in net.parameters()]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"norm": "layer"},
            r"^UNet: norm must be one of \['batch', 'group', 'instance'\], got 'layer'$",
        ),
        (
            {"up": "nearest"},
            r"^UNet: up must be one of \['transpose', 'bilinear'\], got 'nearest'$",
        ),
        ({"depth": 0}, r"^UNet: depth must be an integer >= 1, got 0$"),
        ({"base_width": 0}, r"^UNet: base_width must be an integer >= 1, got 0$"),
        ({"in_channels": 2.5}, r"^UNet: in_channels must be an integer >= 1, got 2.5$"),
        ({"top_skip": "yes"}, r"top_skip='yes'.*true or false"),
    ],
)
def test_invalid_constructor_arguments_are_rejected_by_name(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UNet(**kwargs)


def test_build_unet_rejects_unknown_keys():
    with pytest.raises(
        ConfigError,
        match=r"^model config has unknown key\(s\) \['width'\]; allowed keys: \['in_channels'",
    ):
        build_unet({"width": 4})


def test_input_smaller_than_the_bottleneck_is_rejected():
    net = UNet(base_width=4, depth=3)
    with pytest.raises(ConfigError, match=r"7x9 px is smaller than the minimum 8 px for depth=3"):
        net(torch.randn(1, 3, 7, 9))
    net = UNet(base_width=4, depth=3, norm="instance")
    with pytest.raises(ConfigError, match=r"15x15 px is smaller than the minimum 16 px"):
        net(torch.randn(1, 3, 15, 15))


def test_input_with_wrong_channels_is_rejected():
    net = UNet(base_width=4, depth=2)
    with pytest.raises(ConfigError, match=r"shape \(1, 1, 16, 16\); expected \(B, 3, H, W\)"):
        net(torch.randn(1, 1, 16, 16))

"""Causal convs (channels-last): equal to PyTorch's convs, and streaming equals offline."""

import pytest
import torch
import torch.nn.functional as F

from moshi_core.kernels import build as cpu_kernels
from moshi_core.nn.conv import StreamingConv1d, StreamingConvTranspose1d


def _stream(layer, x: torch.Tensor, chunk: int) -> torch.Tensor:
    state = layer.init_state(x.shape[0])
    return torch.cat([layer.step(piece, state) for piece in x.split(chunk, dim=1)], dim=1)


def _torch_causal_conv(layer: StreamingConv1d, x: torch.Tensor) -> torch.Tensor:
    """The definition: left padding then a plain `F.conv1d`, on [B, C, T]."""
    w, b = layer.conv.conv.weight, layer.conv.conv.bias
    mode = "replicate" if layer.pad_mode == "replicate" else "constant"
    padded = F.pad(x.transpose(1, 2), (layer.padding, 0), mode=mode)
    return F.conv1d(padded, w, b, layer.stride).transpose(1, 2)


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
@pytest.mark.parametrize("kernel,stride", [(7, 1), (3, 1), (1, 1), (8, 4), (4, 2), (16, 8)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels", [(3, 5), (1, 8), (6, 1)], ids=["3-5", "from-1", "to-1"])
def test_conv_equals_torch_offline_and_streaming(kernel, stride, pad_mode, batch, channels):
    torch.manual_seed(0)
    layer = StreamingConv1d(*channels, kernel, stride=stride, pad_mode=pad_mode)
    x = torch.randn(batch, stride * 48, channels[0])  # [B, T, C]
    with torch.no_grad():
        expected = _torch_causal_conv(layer, x)
        assert expected.shape == (batch, 48, channels[1])
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        for chunk_frames in (1, 2, 8):
            torch.testing.assert_close(_stream(layer, x, stride * chunk_frames), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("layer", [
    StreamingConv1d(13, 5, 7), StreamingConv1d(13, 4, 16, stride=8), StreamingConvTranspose1d(13, 8, 4, stride=2),
], ids=["conv", "strided", "transposed"])
def test_streaming_with_elu_first_equals_elu_then_conv(layer, kernels_on, monkeypatch):
    """`step(x, elu=True)` (the SEANet's ELU, fused into the input window) is conv(elu(x))."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", kernels_on)
    torch.manual_seed(0)
    x = 3 * torch.randn(3, 64, 13)
    x[0, :8] = torch.tensor([0.0, -0.0, -1e-7, 1e-7, -100.0, -87.5, 1e-3, -1e-3])[:, None]
    with torch.no_grad():
        expected = layer(F.elu(x))
        for chunk in (8, 24, 64) if layer.stride == 8 else (3, 16, 64):  # odd sizes: the ELU's scalar tail
            state = layer.init_state(3)
            out = torch.cat([layer.step(p, state, elu=True) for p in x.split(chunk, dim=1)], dim=1)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_weight_loads_in_the_official_shape():
    layer = StreamingConv1d(4, 6, 8, stride=4)
    official = torch.randn(6, 4, 8)  # nn.Conv1d layout [C_out, C_in, k]
    layer.load_state_dict({"conv.conv.weight": official, "conv.conv.bias": torch.zeros(6)})
    assert torch.equal(layer.conv.conv.weight, official)
    assert layer.conv.conv.weight.permute(2, 1, 0).is_contiguous()  # stored tap-major


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (8, False), (8, True)])
@pytest.mark.parametrize("kernel,stride", [(16, 8), (4, 2), (6, 3), (2, 2)])
def test_conv_transpose_equals_torch_trimmed(kernel, stride, groups, bias):
    """Sub-pixel formulation == nn.ConvTranspose1d with its last kernel-stride samples cut."""
    torch.manual_seed(0)
    layer = StreamingConvTranspose1d(8, 8, kernel, stride=stride, groups=groups, bias=bias)
    x = torch.randn(2, 20, 8)
    with torch.no_grad():
        full = layer.convtr.convtr(x.transpose(1, 2)).transpose(1, 2)
        expected = full[:, : full.shape[1] - (kernel - stride)]
        assert layer(x).shape == (2, 20 * stride, 8)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        for chunk in (1, 3, 20):
            torch.testing.assert_close(_stream(layer, x, chunk), expected, rtol=1e-5, atol=1e-6)


def test_conv_transpose_follows_weight_changes():
    layer = StreamingConvTranspose1d(4, 4, 4, stride=2)
    x = torch.randn(1, 5, 4)
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer(x), 2 * before, rtol=1e-5, atol=1e-5)  # weights and bias doubled


def test_per_slot_reset_restarts_only_that_slot():
    torch.manual_seed(0)
    layer = StreamingConv1d(2, 3, 5, stride=1, pad_mode="replicate")
    x = torch.randn(2, 30, 2)
    state = layer.init_state(2)
    with torch.no_grad():
        layer.step(x[:, :10], state)
        state.reset(torch.tensor([False, True]))
        out = layer.step(x[:, 10:], state)
        torch.testing.assert_close(out[1:], layer(x[1:, 10:]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[:1], layer(x[:1])[:, 10:], rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_refused():
    layer = StreamingConv1d(1, 1, 4, stride=2)
    with pytest.raises(ValueError, match="multiple of the stride"):
        layer.step(torch.zeros(1, 3, 1), layer.init_state(1))
    with pytest.raises(ValueError, match="multiple of the stride"):
        StreamingConv1d(1, 1, 5, stride=2)

"""Causal convs: streaming equals offline, and the transposed conv equals PyTorch's."""

import pytest
import torch
import torch.nn.functional as F

from moshi_core.conv import GEMM_MAX_STEPS, StreamingConv1d, StreamingConvTranspose1d


def _stream(layer, x: torch.Tensor, chunk: int) -> torch.Tensor:
    state = layer.init_state(x.shape[0])
    return torch.cat([layer.step(piece, state) for piece in x.split(chunk, dim=-1)], dim=-1)


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
@pytest.mark.parametrize("kernel,stride", [(7, 1), (3, 1), (1, 1), (8, 4), (4, 2)])
@pytest.mark.parametrize("chunk_frames", [1, 2, 8])
def test_conv_streaming_equals_offline(kernel, stride, pad_mode, chunk_frames):
    torch.manual_seed(0)
    layer = StreamingConv1d(3, 5, kernel, stride=stride, pad_mode=pad_mode)
    x = torch.randn(2, 3, stride * 48)
    with torch.no_grad():
        offline = layer(x)
        streamed = _stream(layer, x, stride * chunk_frames)
    assert offline.shape == (2, 5, 48)
    torch.testing.assert_close(streamed, offline, rtol=1e-6, atol=1e-6)


def test_conv_offline_is_left_padded_valid_conv():
    torch.manual_seed(0)
    layer = StreamingConv1d(2, 4, 8, stride=4)
    x = torch.randn(1, 2, 64)
    conv = layer.conv.conv
    expected = F.conv1d(F.pad(x, (4, 0)), conv.weight, conv.bias, stride=4)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("steps", [3, GEMM_MAX_STEPS + 5])
def test_gemm_and_onednn_paths_agree(steps):
    torch.manual_seed(0)
    layer = StreamingConv1d(16, 32, 12, stride=6)
    x = torch.randn(2, 16, 6 * steps)
    conv = layer.conv.conv
    expected = F.conv1d(F.pad(x, (6, 0)), conv.weight, conv.bias, stride=6)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,bias", [(1, True), (4, False)])
@pytest.mark.parametrize("kernel,stride", [(16, 8), (4, 2), (6, 3), (2, 2)])
def test_conv_transpose_equals_torch_trimmed(kernel, stride, groups, bias):
    """Sub-pixel formulation == nn.ConvTranspose1d with its last kernel-stride samples cut."""
    torch.manual_seed(0)
    layer = StreamingConvTranspose1d(8, 4, kernel, stride=stride, groups=groups, bias=bias)
    x = torch.randn(2, 8, 20)
    with torch.no_grad():
        full = layer.convtr.convtr(x)
        expected = full[..., : full.shape[-1] - (kernel - stride)]
        assert layer(x).shape == (2, 4, 20 * stride)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        for chunk in (1, 3, 20):
            torch.testing.assert_close(_stream(layer, x, chunk), expected, rtol=1e-5, atol=1e-6)


def test_conv_transpose_follows_weight_changes():
    layer = StreamingConvTranspose1d(4, 4, 4, stride=2)
    x = torch.randn(1, 4, 5)
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})
        after = layer(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)  # weights and bias doubled


def test_per_slot_reset_restarts_only_that_slot():
    torch.manual_seed(0)
    layer = StreamingConv1d(2, 3, 5, stride=1, pad_mode="replicate")
    x = torch.randn(2, 2, 30)
    state = layer.init_state(2)
    with torch.no_grad():
        layer.step(x[..., :10], state)
        state.reset(torch.tensor([False, True]))
        out = layer.step(x[..., 10:], state)
        fresh = layer(x[1:, :, 10:])
        continued = layer(x[:1])[..., 10:]
    torch.testing.assert_close(out[1:], fresh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:1], continued, rtol=1e-6, atol=1e-6)


def test_stride_mismatch_is_refused():
    layer = StreamingConv1d(1, 1, 4, stride=2)
    with pytest.raises(ValueError, match="multiple of the stride"):
        layer.step(torch.zeros(1, 1, 3), layer.init_state(1))

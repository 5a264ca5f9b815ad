"""Windowed RoPE transformer: against the reference, streaming vs offline, ring wrap, reset."""

import pytest
import torch

from moshi_core.transformer import ProjectedTransformer, TransformerConfig
from oracle import official_state_dict

SMALL = dict(d_model=64, num_heads=4, num_layers=2, layer_scale=0.01, context=6, dim_feedforward=128,
             input_dimension=64, output_dimensions=(64,))


@pytest.fixture(scope="module")
def pair():
    from moshi.modules.transformer import ProjectedTransformer as Reference

    torch.manual_seed(0)
    ref_kwargs = dict(SMALL, output_dimensions=[64], causal=True, conv_layout=True, max_period=10000,
                      gating="none", norm="layer_norm", positional_embedding="rope")
    ref = Reference(**ref_kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "scale" in name:
                p.uniform_(0.2, 1.0)
    ours = ProjectedTransformer(TransformerConfig(**SMALL)).eval()
    ours.load_state_dict(official_state_dict(ref))
    return ours, ref


def _stream(model, x, chunk, max_step=None):
    state = model.init_state(x.shape[0], max_step or chunk)
    return torch.cat([model.step(piece, state) for piece in x.split(chunk, dim=1)], dim=1)


def _reference(ref, x):
    """The reference works on [B, C, T] (conv layout); ours on [B, T, C]."""
    return ref(x.transpose(1, 2))[0].transpose(1, 2)


def test_offline_matches_reference_beyond_the_window(pair):
    ours, ref = pair
    x = torch.randn(2, 23, 64)  # [B, T, C], T well past the context of 6
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _reference(ref, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streaming_equals_offline_at_any_length(pair, chunk):
    ours, _ = pair
    x = torch.randn(2, 25, 64)
    with torch.no_grad():
        torch.testing.assert_close(_stream(ours, x, chunk), ours(x), rtol=1e-5, atol=1e-5)


def test_streaming_matches_reference_streaming_inside_window(pair):
    ours, ref = pair
    x = torch.randn(1, 6, 64)
    with torch.no_grad(), ref.streaming(1):
        expected = torch.cat([_reference(ref, piece) for piece in x.split(2, dim=1)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(_stream(ours, x, 2), expected, rtol=1e-5, atol=1e-5)


def test_reset_one_slot_while_the_other_continues(pair):
    ours, _ = pair
    x = torch.randn(2, 20, 64)
    state = ours.init_state(2, 2)
    with torch.no_grad():
        for piece in x[:, :10].split(2, dim=1):
            ours.step(piece, state)
        state.reset(torch.tensor([True, False]))
        out = torch.cat([ours.step(piece, state) for piece in x[:, 10:].split(2, dim=1)], dim=1)
        torch.testing.assert_close(out[:1], ours(x[:1, 10:]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:], ours(x[1:])[:, 10:], rtol=1e-5, atol=1e-5)


def test_step_larger_than_cache_is_refused(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="max_step"):
        ours.step(torch.randn(1, 3, 64), ours.init_state(1, 2))


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="gating"):
        TransformerConfig(gating="silu")

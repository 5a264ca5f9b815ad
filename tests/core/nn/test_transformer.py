"""Our transformer against the reference's, in the configurations Kyutai's models use."""

import pytest
import torch
from oracle import official_state_dict

from moshi_core.nn.transformer import Transformer, TransformerConfig

CONFIGS = {
    # Mimi's encoder/decoder transformer, scaled down.
    "mimi": dict(d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, layer_scale=0.01, context=6,
                 norm="layer_norm", gating="none", positional_embedding="rope"),
    # Moshi's temporal transformer (Helium), scaled down: RMSNorm in float32, SiLU gating.
    "helium": dict(d_model=64, num_heads=4, num_layers=2, dim_feedforward=264, layer_scale=None, context=5,
                   norm="rms_norm_f32", gating="silu", positional_embedding="rope"),
    # Moshi's depth transformer: weights per codebook step (shared by a schedule), no positions.
    "depformer": dict(d_model=32, num_heads=2, num_layers=2, dim_feedforward=132, layer_scale=None, context=None,
                      norm="rms_norm_f32", gating="silu", positional_embedding="none",
                      weights_per_step=3, weights_per_step_schedule=[0, 1, 1]),
    # The reference's own tiny test LM: LayerNorm, sinusoidal positions, 4 steps of context.
    "tiny-main": dict(d_model=16, num_heads=1, num_layers=2, dim_feedforward=16, layer_scale=None, context=4,
                      norm="layer_norm", gating="none", positional_embedding="sin"),
    "tiny-depformer": dict(d_model=16, num_heads=1, num_layers=2, dim_feedforward=16, layer_scale=None,
                           context=None, norm="layer_norm", gating="silu", positional_embedding="sin",
                           weights_per_step=3, weights_per_step_schedule=[0, 1, 1]),
    # The remaining norm variants.
    "norms": dict(d_model=32, num_heads=2, num_layers=2, dim_feedforward=128, layer_scale=0.1, context=3,
                  norm="layer_norm_f32", gating="silu", positional_embedding="rope"),
    "rms": dict(d_model=32, num_heads=2, num_layers=1, dim_feedforward=128, layer_scale=None, context=3,
                norm="rms_norm", gating="gelu", positional_embedding="rope"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    from moshi.modules.transformer import StreamingTransformer

    kwargs = CONFIGS[request.param]
    torch.manual_seed(0)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "weights_per_step" or v}
    ref = StreamingTransformer(causal=True, max_period=10000, **ref_kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "scale" in name or "alpha" in name or "norm" in name:
                p.uniform_(0.5, 1.5)  # make norms and layer scales matter
    ours = Transformer(TransformerConfig(**kwargs)).eval()
    ours.load_state_dict(official_state_dict(ref), strict=True)
    return ours, ref, kwargs


def _length(kwargs) -> int:
    return kwargs.get("weights_per_step") or 13


def test_offline_matches_reference(pair):
    ours, ref, kwargs = pair
    x = torch.randn(2, _length(kwargs), ours.cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_step_by_step_matches_reference_streaming(pair):
    ours, ref, kwargs = pair
    x = torch.randn(2, _length(kwargs), ours.cfg.d_model)
    with torch.no_grad(), ref.streaming(2):
        expected = torch.cat([ref(x[:, t : t + 1]) for t in range(x.shape[1])], dim=1)
    state = ours.init_state(2)
    with torch.no_grad():
        got = torch.cat([ours.step(x[:, t : t + 1], state) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 5])
def test_streaming_equals_offline_at_any_length(pair, chunk):
    ours, _, kwargs = pair
    x = torch.randn(2, 25 if not kwargs.get("weights_per_step") else 3, ours.cfg.d_model)
    state = ours.init_state(2, max_step=chunk)
    with torch.no_grad():
        got = torch.cat([ours.step(piece, state) for piece in x.split(chunk, dim=1)], dim=1)
        torch.testing.assert_close(got, ours(x), rtol=1e-5, atol=1e-5)


# Per-step weights restart with the whole state (the depth transformer does, every frame).
@pytest.mark.parametrize("name", [n for n, kw in CONFIGS.items() if not kw.get("weights_per_step")])
def test_reset_one_slot_while_the_other_continues(name):
    torch.manual_seed(0)
    ours = Transformer(TransformerConfig(**CONFIGS[name])).eval()
    x = torch.randn(2, 20, ours.cfg.d_model)
    state = ours.init_state(2, 2)
    with torch.no_grad():
        for piece in x[:, :10].split(2, dim=1):
            ours.step(piece, state)
        state.reset(torch.tensor([True, False]))
        out = torch.cat([ours.step(piece, state) for piece in x[:, 10:].split(2, dim=1)], dim=1)
        torch.testing.assert_close(out[:1], ours(x[:1, 10:]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:], ours(x[1:])[:, 10:], rtol=1e-5, atol=1e-5)


def test_step_larger_than_cache_is_refused():
    model = Transformer(TransformerConfig(**CONFIGS["mimi"]))
    with pytest.raises(ValueError, match="max_step"):
        model.step(torch.randn(1, 3, 64), model.init_state(1, 2))
    depformer = Transformer(TransformerConfig(**CONFIGS["depformer"]))
    state = depformer.init_state(1)
    with pytest.raises(ValueError, match="per-step weights|capacity"):
        for _ in range(4):
            depformer.step(torch.randn(1, 1, 32), state)


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="gating"):
        TransformerConfig(gating="swish")
    with pytest.raises(ValueError, match="norm"):
        TransformerConfig(norm="batch_norm")
    with pytest.raises(ValueError, match="schedule"):
        TransformerConfig(weights_per_step=3, weights_per_step_schedule=[0, 1])

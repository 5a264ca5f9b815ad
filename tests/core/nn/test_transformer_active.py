"""Lockstep stepping of the transformer: every stream computes, an `active` mask says whose cache advances."""

import pytest
import torch

from moshi_core.kernels import build
from moshi_core.nn.transformer import Transformer, TransformerConfig

CONFIGS = {
    "mimi": dict(d_model=32, num_heads=2, num_layers=2, dim_feedforward=64, layer_scale=0.01, context=4,
                 norm="layer_norm", gating="none", positional_embedding="rope"),
    "helium": dict(d_model=32, num_heads=2, num_layers=2, dim_feedforward=132, layer_scale=None, context=5,
                   norm="rms_norm_f32", gating="silu", positional_embedding="rope"),
    "sin": dict(d_model=16, num_heads=1, num_layers=2, dim_feedforward=16, layer_scale=None, context=3,
                norm="layer_norm", gating="none", positional_embedding="sin"),
}
B, STEPS = 3, 14


@pytest.fixture(params=[True, False], ids=["kernels", "portable"])
def kernels(request):
    was = build.ENABLED
    build.set_enabled(request.param)
    yield
    build.set_enabled(was)


def _schedule(seed: int = 0) -> torch.Tensor:
    """[STEPS, B] bool: which streams step at each step; stream 2 joins late, stream 0 pauses."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(STEPS, B, generator=g) < 0.6
    active[:5, 2] = False
    active[0, :2] = True
    return active


@pytest.mark.parametrize("name", list(CONFIGS))
def test_active_mask_equals_stepping_the_active_rows(name, kernels):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**CONFIGS[name])).eval()
    x = torch.randn(STEPS, B, 1, model.cfg.d_model)
    active = _schedule()
    masked, by_rows = model.init_state(B), model.init_state(B)
    with torch.no_grad():
        for t in range(STEPS):
            got = model.step(x[t], masked, active=active[t])
            rows = active[t].nonzero()[:, 0]
            if len(rows):
                want = model.step(x[t][rows], by_rows, rows=rows)
                torch.testing.assert_close(got[rows], want, rtol=0, atol=1e-6)
            assert torch.isfinite(got).all()  # inactive streams compute too, never to NaN
            assert torch.equal(masked.offset, by_rows.offset)
            assert torch.equal(masked.positions, by_rows.positions)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_masked_steps_leave_a_stream_as_it_was(name, kernels):
    """A stream's real outputs are those of a stream that never saw its masked-out steps."""
    torch.manual_seed(1)
    model = Transformer(TransformerConfig(**CONFIGS[name])).eval()
    x = torch.randn(STEPS, B, 1, model.cfg.d_model)
    active = _schedule(2)
    masked = model.init_state(B)
    lone = [model.init_state(1) for _ in range(B)]
    with torch.no_grad():
        for t in range(STEPS):
            got = model.step(x[t], masked, active=active[t])
            for s in range(B):
                if active[t, s]:
                    torch.testing.assert_close(got[s : s + 1], model.step(x[t, s : s + 1], lone[s]),
                                               rtol=0, atol=1e-6)


def test_temporal_cache_keeps_no_step_count():
    """A compiled step must read no Python int that grows: only per-step weights count steps."""
    temporal = Transformer(TransformerConfig(**CONFIGS["helium"]))
    depth = Transformer(TransformerConfig(d_model=16, num_heads=1, num_layers=1, dim_feedforward=16, context=None,
                                          positional_embedding="none", weights_per_step=2))
    state, depth_state = temporal.init_state(1), depth.init_state(1)
    with torch.no_grad():
        for _ in range(2):
            temporal.step(torch.randn(1, 1, 32), state)
            depth.step(torch.randn(1, 1, 16), depth_state)
    assert state.steps == 0 and depth_state.steps == 2


def test_rows_and_active_together_are_refused():
    model = Transformer(TransformerConfig(**CONFIGS["sin"]))
    with pytest.raises(ValueError, match="not both"):
        model.step(torch.randn(1, 1, 16), model.init_state(2), rows=torch.tensor([0]), active=torch.ones(2, dtype=bool))

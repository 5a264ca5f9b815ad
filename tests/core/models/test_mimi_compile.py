"""Mimi's lockstep streaming step as one graph: `torch._dynamo` finds no graph break in
`encode_step` / `decode_step` with an active mask, and `torch.compile(..., fullgraph=True)`
never recompiles while streams join and leave, giving eager's numbers. All on the portable
path (CPU kernels off), which is what a GPU runs; float32."""

import pytest
import torch
from tiny_mimi import tiny_mimi

from moshi_core.kernels import build

FRAME = 1920
STEPS = 200
STREAMS = 4


@pytest.fixture
def portable():
    build.set_enabled(False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    build.set_enabled(True)


@pytest.mark.slow
def test_full_size_step_has_no_graph_break(our_mimi, portable):
    state = our_mimi.init_state(3)
    active = torch.tensor([True, False, True])
    wav = torch.randn(3, 1, FRAME, generator=torch.Generator().manual_seed(0)) * 0.3
    with torch.inference_mode():
        codes = our_mimi.encode_step(wav, state, active=active)
        for step, args in ((our_mimi.encode_step, (wav, state)), (our_mimi.decode_step, (codes, state))):
            explained = torch._dynamo.explain(step)(*args, active=active)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert explained.graph_count == 1


def _schedule(generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(joins, active) [STREAMS] bool per step: joins at a few points, each stream idle about
    a quarter of the steps (short leaves and one long one), and a step with every stream idle."""
    active = torch.rand(STEPS, STREAMS, generator=generator) > 0.25
    active[60:100, 2] = False
    active[150] = False
    joins = torch.zeros(STEPS, STREAMS, dtype=torch.bool)
    joins[0] = True
    for step, stream in ((20, 1), (50, 3), (100, 2), (140, 0), (141, 1), (170, 3)):
        joins[step, stream] = True
        active[step, stream] = True
    return list(zip(joins, active))


@pytest.mark.slow
def test_compiled_step_never_recompiles_and_equals_eager(portable):
    """Inductor, 200 steps. Codes equal exactly; audio within 1e-5 (inductor fuses and
    reorders float32 sums: about 1e-7 apart here, from samples of about 1e-1)."""
    mimi = tiny_mimi()
    generator = torch.Generator().manual_seed(0)
    eager, compiled = mimi.init_state(STREAMS), mimi.init_state(STREAMS)
    encode = torch.compile(mimi.encode_step, fullgraph=True)
    decode = torch.compile(mimi.decode_step, fullgraph=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        for joins, active in _schedule(generator):
            eager.reset(joins)
            compiled.reset(joins)
            wav = torch.randn(STREAMS, 1, FRAME, generator=generator) * 0.3
            # compiled first: the weights a step derives must exist before its first trace
            got = encode(wav, compiled, active=active)
            codes = mimi.encode_step(wav, eager, active=active)
            assert torch.equal(got[active], codes[active])
            got = decode(codes, compiled, active=active)
            audio = mimi.decode_step(codes, eager, active=active)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got[active], audio[active], rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2  # one graph each, compiled once

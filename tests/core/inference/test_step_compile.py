"""The lockstep LM step is one graph: no graph break, no recompilation while slots join and
leave, and compiled tokens equal eager ones (the portable PyTorch path, float32, CPU)."""

import pytest
import torch
from oracle import REDUCED_7B, TINY_TEST_LM

from moshi_core.inference.generate import LMGenerator
from moshi_core.kernels import build
from moshi_core.models.lm import UNGENERATED_TOKEN, LMConfig, LMModel
from moshi_core.params import SamplingParams

B = 3
HOT = SamplingParams(temp=1.0, temp_text=1.0)


@pytest.fixture(autouse=True)
def portable():
    """The fused CPU kernels are opaque to dynamo: the graph is traced on PyTorch's own ops."""
    was = build.ENABLED
    build.set_enabled(False)
    yield
    build.set_enabled(was)


def _generator(kwargs: dict, **changes) -> LMGenerator:
    torch.manual_seed(0)
    return LMGenerator(LMModel(LMConfig.from_dict(dict(kwargs, **changes))).eval())


def _state(gen: LMGenerator, params: list[SamplingParams]):
    state = gen.init_state(len(params), per_slot_sampling=True)
    for slot, p in enumerate(params):
        state.slots.configure(slot, p, seed=10 + slot)
    return state


def _codes(gen: LMGenerator, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, gen.lm.cfg.card, (B, gen.num_user_streams, 1), generator=g)


@pytest.mark.parametrize("params", [[HOT] * B, [HOT, SamplingParams.greedy(), SamplingParams(top_k=3)]],
                         ids=["sampled", "mixed"])
@pytest.mark.parametrize("config", ["tiny-test", pytest.param("reduced-7b", marks=pytest.mark.slow)])
def test_lockstep_step_has_no_graph_break(config, params):
    gen = _generator({"tiny-test": TINY_TEST_LM, "reduced-7b": REDUCED_7B}[config])
    state = _state(gen, params)
    active = torch.tensor([True, False, True])
    explained = torch._dynamo.explain(gen.step)(_codes(gen, 0), state, active=active)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_step_with_extra_heads_has_no_graph_break():
    gen = _generator(TINY_TEST_LM, extra_heads_num_heads=2, extra_heads_dim=6)
    state = _state(gen, [HOT] * B)
    explained = torch._dynamo.explain(gen.step_with_extra_heads)(_codes(gen, 0), state,
                                                                 active=torch.ones(B, dtype=torch.bool))
    assert explained.graph_break_count == 0, explained.break_reasons


def _join(state, slot: int, params: SamplingParams, seed: int) -> None:
    state.slots.configure(slot, params, seed)
    mask = torch.zeros(B, dtype=torch.bool)
    mask[slot] = True
    state.reset(mask)


# step -> (slot, params and seed to join with; None: the slot leaves)
EVENTS = {0: [(0, (HOT, 1)), (1, (SamplingParams(top_k=5, top_k_text=3), 2)), (2, None)],
          30: [(2, (SamplingParams.greedy(), 3))], 60: [(0, None)], 90: [(0, (HOT, 4))],
          140: [(1, None)], 170: [(1, (SamplingParams(temp=0.5), 5))], 185: [(2, None)]}


@pytest.mark.slow  # about a minute: 200 steps each way plus one compilation
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@torch._dynamo.config.patch(error_on_recompile=True)
def test_compiled_step_equals_eager_over_joins_and_leaves(backend):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = _generator(TINY_TEST_LM), _generator(TINY_TEST_LM)
    compiled.compile_step(backend=backend)
    states = [_state(g, [HOT] * B) for g in (eager, compiled)]
    active = torch.zeros(B, dtype=torch.bool)
    seen = 0
    for t in range(200):
        for slot, join in EVENTS.get(t, []):
            active[slot] = join is not None
            for state in states:
                if join is not None:
                    _join(state, slot, *join)
        with torch.inference_mode():
            want, got = (g.step(_codes(g, t), s, active=active.clone()) for g, s in zip((eager, compiled), states))
        assert torch.equal(got, want), t
        assert (want[~active] == UNGENERATED_TOKEN).all()
        seen += int((want[active] >= 0).all(dim=1).sum())
    assert torch.equal(states[0].offsets, states[1].offsets)
    assert seen > 300  # the active slots produced frames all along
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@torch._dynamo.config.patch(error_on_recompile=True)
def test_warm_up_compiles_before_the_first_step():
    """Warm-up traces the lockstep step on a state (reset afterwards); a state made later reuses that graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = _generator(TINY_TEST_LM)
    gen.compile_step(backend="eager")
    with torch.inference_mode():
        assert gen.warm_up(gen.init_state(B, per_slot_sampling=True)) > 0
    with torch.inference_mode():  # as the engines and the warm-up build and step their states
        state = _state(gen, [HOT, SamplingParams.greedy(), HOT])
        for t in range(3):
            gen.step(_codes(gen, t), state, active=torch.tensor([True, t > 0, False]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert state.offsets.tolist() == [3, 2, 0]

"""Streaming generation against the reference's `LMGen`, and our own guarantees."""

import pytest
import torch
from oracle import REDUCED_7B, TINY_TEST_LM, write_reference_lm

from moshi_core.inference.generate import LMGenerator
from moshi_core.inference.sampling import SlotSampling
from moshi_core.loading.checkpoints import load_lm
from moshi_core.models.lm import UNGENERATED_TOKEN, LMConfig
from moshi_core.params import SamplingParams

STEPS = 60


@pytest.fixture(scope="module", params=["reduced-7b", "tiny-test"])
def pair(request, tmp_path_factory):
    kwargs = {"reduced-7b": REDUCED_7B, "tiny-test": TINY_TEST_LM}[request.param]
    path = tmp_path_factory.mktemp("lm") / "model.safetensors"
    ref = write_reference_lm(path, kwargs)
    return load_lm(path, LMConfig.from_dict(kwargs), dtype=torch.float32), ref, kwargs


def _user_codes(kwargs, steps=STEPS, B=2, seed=1):
    n_user = kwargs["n_q"] - kwargs["dep_q"]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, kwargs["card"], (steps, B, max(n_user, 1), 1), generator=g)[:, :, :n_user]


def test_greedy_generation_matches_reference(pair):
    ours, ref, kwargs = pair
    from moshi.models.lm import LMGen

    user = _user_codes(kwargs)
    ref_gen = LMGen(ref, use_sampling=False)
    expected = []
    with torch.no_grad(), ref_gen.streaming(2):
        for t in range(STEPS):
            out = ref_gen.step(user[t])
            expected.append(None if out is None else out[..., 0])
    gen = LMGenerator(ours, SamplingParams.greedy())
    state = gen.init_state(2)
    got = [gen.step(user[t], state) for t in range(STEPS)]
    warmup = max(kwargs["delays"])  # steps before the first complete frame
    assert all(e is None for e in expected[:warmup]) and all((g == UNGENERATED_TOKEN).all() for g in got[:warmup])
    assert torch.equal(torch.stack(got[warmup:]), torch.stack(expected[warmup:]))
    assert len(torch.stack(got[warmup:]).unique()) > 5  # not a degenerate constant output


def test_sampling_is_reproducible_with_a_seed(pair):
    ours, _, kwargs = pair
    user = _user_codes(kwargs, steps=20)

    def run(seed):
        gen = LMGenerator(ours, SamplingParams(temp=1.0, temp_text=1.0), seed=seed)
        state = gen.init_state(2)
        return torch.stack([gen.step(user[t], state) for t in range(20)])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_per_slot_sampling_draws_as_a_lone_slot_would(pair):
    """Each slot with its own seed and parameters gives what a batch of one with that seed gives."""
    ours, _, kwargs = pair
    user = _user_codes(kwargs, steps=20)
    hot = SamplingParams(temp=1.0, temp_text=1.0)
    gen = LMGenerator(ours, SamplingParams.greedy())
    state = gen.init_state(2, per_slot_sampling=True)
    state.slots.configure(0, hot, seed=3)
    state.slots.configure(1, SamplingParams(temp=1.0, temp_text=1.0, top_k=5), seed=4)
    both = torch.stack([gen.step(user[t], state) for t in range(20)])
    for slot, (params, seed) in enumerate([(hot, 3), (state.slots.params[1], 4)]):
        alone = LMGenerator(ours, params, seed=seed)
        lone = alone.init_state(1)
        assert torch.equal(both[:, slot], torch.stack([alone.step(user[t, slot:slot + 1], lone)[0] for t in range(20)]))


def test_reset_starts_a_new_conversation_in_one_slot(pair):
    ours, _, kwargs = pair
    user = _user_codes(kwargs, steps=30)
    gen = LMGenerator(ours, SamplingParams.greedy())
    state = gen.init_state(2)
    for t in range(12):
        gen.step(user[t], state)
    state.reset(torch.tensor([False, True]))
    both = torch.stack([gen.step(user[t], state) for t in range(12, 30)])
    alone = LMGenerator(ours, SamplingParams.greedy())
    fresh, whole = alone.init_state(1), alone.init_state(1)
    new = torch.stack([alone.step(user[t, 1:], fresh) for t in range(12, 30)])
    old = torch.stack([alone.step(user[t, :1], whole) for t in range(30)])[12:]
    assert torch.equal(both[:, 1:], new)
    assert torch.equal(both[:, :1], old)


@pytest.mark.slow  # 4000 steps
def test_conversation_past_the_context_keeps_going():
    """4000 steps (> 5 minutes of audio) at a tiny config with a 16-step context."""
    cfg = LMConfig.from_dict(dict(REDUCED_7B, dim=16, num_heads=1, context=16, depformer_dim=8, depformer_num_heads=1,
                                  depformer_dim_feedforward=16, num_layers=1, depformer_num_layers=1))
    from moshi_core.models.lm import LMModel

    torch.manual_seed(0)
    lm = LMModel(cfg).eval()
    gen = LMGenerator(lm, SamplingParams(), seed=0)
    state = gen.init_state(1)
    user = torch.zeros(1, 8, 1, dtype=torch.long)
    for _ in range(4000):
        out = gen.step(user, state)
    assert int(state.offsets[0]) == 4000
    assert ((out >= 0) & (out < 2048)).all()


def test_sampling_top_k_and_greedy():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    slots = SlotSampling(2)
    slots.configure(0, SamplingParams.greedy())
    slots.configure(1, SamplingParams(temp_text=1.0, top_k_text=2), seed=0)
    draws = torch.stack([slots.sample(logits.expand(2, -1), text=True) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1}
    assert set(draws[:, 1].tolist()) == {1, 3}  # only the top 2 are ever drawn
    from moshi_core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="temp"):
        SamplingParams(temp=-1)

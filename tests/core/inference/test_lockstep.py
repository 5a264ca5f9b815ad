"""The lockstep step (every slot computes, an active mask says whose state advances) against
stepping the active rows only and against each conversation alone; and the graph-safe
sampling it draws with: uniform noise, the right distribution, per-row parameters."""

import math

import pytest
import torch
from oracle import REDUCED_7B, TINY_TEST_LM

from moshi_core.inference.generate import LMGenerator
from moshi_core.inference.sampling import SlotSampling, seed_key, uniform_noise
from moshi_core.models.lm import UNGENERATED_TOKEN, LMConfig, LMModel
from moshi_core.params import SamplingParams

B = 3
HOT = SamplingParams(temp=1.0, temp_text=1.0)
# percent of the run -> (slot, (params, seed) of who joins there; None: the slot's conversation leaves)
EVENTS = {0: [(0, (HOT, 1)), (2, (SamplingParams(top_k=5, top_k_text=3), 2))],
          8: [(1, (SamplingParams(temp=0.5, top_k=0), 3))], 25: [(0, None)], 34: [(0, (HOT, 4))],
          50: [(2, None)], 62: [(1, (SamplingParams.greedy(), 5))], 73: [(2, (HOT, 6))], 92: [(0, None)]}


@pytest.fixture(scope="module")
def models():
    built = {}
    for name, kwargs in (("tiny-test", TINY_TEST_LM), ("reduced-7b", REDUCED_7B)):
        torch.manual_seed(0)
        built[name] = LMModel(LMConfig.from_dict(kwargs)).eval()
    return built


@pytest.mark.parametrize("config, steps", [("tiny-test", 40), pytest.param("tiny-test", 120, marks=pytest.mark.slow),
                                           pytest.param("reduced-7b", 120, marks=pytest.mark.slow)])
def test_active_mask_equals_rows_equals_alone(models, config, steps):
    lm = models[config]
    gen = LMGenerator(lm)
    n_user = gen.num_user_streams
    user = torch.randint(0, lm.cfg.card, (steps, B, n_user, 1), generator=torch.Generator().manual_seed(0))
    events = {percent * steps // 100: changes for percent, changes in EVENTS.items()}
    masked, by_rows = (gen.init_state(B, per_slot_sampling=True) for _ in range(2))
    active = torch.zeros(B, dtype=torch.bool)
    alone: dict[int, tuple] = {}  # slot -> (lone generator, its state) of the conversation there
    checked = 0
    for t in range(steps):
        for slot, join in events.get(t, []):
            active[slot] = join is not None
            alone.pop(slot, None)
            if join is None:
                continue
            params, seed = join
            for state in (masked, by_rows):
                state.slots.configure(slot, params, seed)
                state.reset(torch.arange(B) == slot)
            lone = LMGenerator(lm, params, seed=seed)
            alone[slot] = (lone, lone.init_state(1))
        rows = active.nonzero()[:, 0]
        with torch.inference_mode():
            out = gen.step(user[t], masked, active=active.clone())
            got = gen.step(user[t][rows], by_rows, rows=rows) if len(rows) else None
            assert (out[~active] == UNGENERATED_TOKEN).all()
            for i, slot in enumerate(rows.tolist()):
                lone, state = alone[slot]
                want = lone.step(user[t, slot : slot + 1], state)[0]
                assert torch.equal(out[slot], want), (t, slot)
                assert torch.equal(got[i], want), (t, slot)
                checked += int((want >= 0).all())
    assert torch.equal(masked.offsets, by_rows.offsets)
    assert checked > steps  # real frames, not only the placeholders of first steps


def test_noise_is_uniform():
    """Chi-square over 64 bins (63 degrees of freedom: 99.9% quantile ~ 103), across the
    vocabulary of one draw, across the draws of one entry, and across seeds."""
    n = 64_000
    samples = {
        "vocabulary": uniform_noise(seed_key(torch.tensor([5])), torch.tensor([3]), torch.arange(n)[None])[0],
        "draws": uniform_noise(seed_key(torch.full((n,), 5)), torch.arange(n), torch.full((n, 1), 7))[:, 0],
        "seeds": uniform_noise(seed_key(torch.arange(n)), torch.zeros(n, dtype=torch.long),
                               torch.zeros(n, 1, dtype=torch.long))[:, 0],
    }
    for name, u in samples.items():
        assert 0 < u.min() and u.max() < 1, name
        counts = torch.histc(u.double(), bins=64, min=0, max=1)
        chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
        assert chi2 < 103, (name, chi2)
    # Neighbouring entries of one draw are not correlated.
    u = samples["vocabulary"]
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.02


def test_draws_follow_softmax_of_the_logits_over_the_top_k():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -3.0])
    rows, draws = 4, 4000
    slots = SlotSampling(rows)
    params = [SamplingParams(temp_text=1.0, top_k_text=0), SamplingParams(temp_text=0.5, top_k_text=0),
              SamplingParams(temp_text=1.0, top_k_text=3), SamplingParams(temp_text=0.0)]
    for row, p in enumerate(params):
        slots.configure(row, p, seed=100 + row)
    tokens = torch.stack([slots.sample(logits.expand(rows, -1), text=True) for _ in range(draws)])
    for row, (temperature, kept) in enumerate([(1.0, 6), (0.5, 6), (1.0, 3)]):
        top = logits.topk(kept)
        expected = torch.zeros_like(logits).scatter(0, top.indices, torch.softmax(top.values / temperature, 0))
        frequencies = torch.bincount(tokens[:, row], minlength=len(logits)).double() / draws
        # Four standard errors of a frequency, at most: sqrt(p (1 - p) / draws) <= 0.008.
        assert (frequencies - expected).abs().max() < 4 * math.sqrt(0.25 / draws), row
        assert (frequencies[expected == 0] == 0).all()  # outside the top k: never
    assert (tokens[:, 3] == 0).all()  # greedy


def test_each_row_keeps_its_own_parameters_per_stream():
    slots = SlotSampling(2)
    slots.configure(0, SamplingParams(temp_text=1.0, top_k_text=1, temp=5.0, top_k=0), seed=1)
    slots.configure(1, SamplingParams(use_sampling=False), seed=2)
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    text = torch.stack([slots.sample(logits, text=True) for _ in range(50)])
    audio = torch.stack([slots.sample(logits, text=False) for _ in range(200)])
    assert (text == logits.argmax(-1)).all()  # top-1 text, and greedy
    assert (audio[:, 1] == logits[1].argmax()).all()
    assert len(audio[:, 0].unique()) > 30  # hot and keeping all: spreads over the vocabulary


def test_a_row_draws_the_same_whatever_shares_the_batch():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    batch, alone = SlotSampling(3), SlotSampling(1)
    for row in range(3):
        batch.configure(row, HOT, seed=row)
    alone.configure(0, HOT, seed=1)
    active = torch.tensor([True, False, True])
    together = [batch.sample(logits, text=True, active=active) for _ in range(20)]
    # Row 1 did not draw under the mask: its counter is where a lone row's starts.
    lone = [alone.sample(logits[1:2], text=True) for _ in range(20)]
    assert torch.equal(batch.draws, torch.tensor([20, 0, 20]))
    again = [batch.sample(logits[1:2], text=True, rows=torch.tensor([1])) for _ in range(20)]
    assert torch.equal(torch.cat(again), torch.cat(lone))
    assert len(torch.stack(together)[:, 0].unique()) > 3


def test_reset_restarts_the_draws_and_reseeds_only_unseeded_rows():
    slots = SlotSampling(2)
    slots.configure(0, HOT, seed=9)
    slots.configure(1, HOT)  # a random seed
    logits = torch.zeros(2, 1000)
    first = torch.stack([slots.sample(logits, text=False) for _ in range(5)])
    slots.reset(torch.tensor([True, True]))
    second = torch.stack([slots.sample(logits, text=False) for _ in range(5)])
    assert torch.equal(first[:, 0], second[:, 0])
    assert not torch.equal(first[:, 1], second[:, 1])


def test_seeds_out_of_range_are_refused():
    from moshi_core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="seed"):
        SlotSampling(1).configure(0, HOT, seed=2**64)

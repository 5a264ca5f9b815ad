"""Mimi's lockstep streaming step: every stream computes, an `active` mask decides whose state
advances. It must give what the rows path (stepping only the active streams) and each stream
alone give, while streams join (`state.reset(mask)`) and leave (inactive) at any frame."""

import pytest
import torch
from tiny_mimi import tiny_mimi

from moshi_core.errors import InvalidParameterError
from moshi_core.kernels import build
from moshi_core.nn.streaming import StateGroup

FRAME = 1920
# One string per frame, one letter per stream: the conversation it runs ("-": the stream is free).
# A new letter on a stream is a join (its slot is reset first); a dash, a leave or a pause.
SCHEDULE = ["a--", "ab-", "abc", "-bc", "d-c", "dbc", "db-", "dbe", "-be", "fbe", "f-e", "fge", "fg-", "fge"]


@pytest.fixture(params=[True, False], ids=["kernels", "portable"])
def kernels(request):
    build.set_enabled(request.param)
    yield request.param
    build.set_enabled(True)


@pytest.fixture(scope="module")
def mimi():
    return tiny_mimi()


@pytest.fixture(scope="module")
def sources() -> dict[str, torch.Tensor]:
    """Each conversation's audio [1, 1, T]: enough frames for the schedule."""
    generator = torch.Generator().manual_seed(1)
    return {c: torch.randn(1, 1, FRAME * len(SCHEDULE), generator=generator) * 0.3 for c in "abcdefg"}


def _drive(step, state, inputs: dict[str, torch.Tensor], per_frame: int, lockstep: bool) -> dict[str, torch.Tensor]:
    """Run SCHEDULE with `step` (Mimi's encode or decode step) on `state`; each active
    conversation takes its next `per_frame` columns of inputs[c].

    lockstep: every stream is stepped with the active mask (free streams are fed noise, whose
    outputs must be finite and are dropped); else only the active streams are, as `rows`.
    Returns each conversation's outputs, concatenated."""
    running, taken, outputs = ["-"] * 3, {c: 0 for c in inputs}, {c: [] for c in inputs}
    for frame in SCHEDULE:
        joins = torch.tensor([c != "-" and c != running[s] for s, c in enumerate(frame)])
        running = [c if c != "-" else r for c, r in zip(frame, running)]
        state.reset(joins)
        streams = [s for s, c in enumerate(frame) if c != "-"]
        parts = {s: inputs[frame[s]][..., taken[frame[s]] : taken[frame[s]] + per_frame] for s in streams}
        if lockstep:
            like = inputs["a"][..., :per_frame]
            filler = torch.randn_like(like) if like.dtype.is_floating_point else torch.randint_like(like, 8)
            x = torch.cat([parts.get(s, filler) for s in range(3)])
            y = step(x, state, active=torch.tensor([c != "-" for c in frame]))
            assert torch.isfinite(y.float()).all()
            y = y[streams]
        else:
            y = step(torch.cat([parts[s] for s in streams]), state, rows=torch.tensor(streams))
        for i, s in enumerate(streams):
            outputs[frame[s]].append(y[i : i + 1])
            taken[frame[s]] += per_frame
    return {c: torch.cat(o, dim=-1) for c, o in outputs.items()}


def test_lockstep_equals_rows_and_alone(mimi, sources, kernels):
    with torch.inference_mode():
        by_codes = {}
        for lockstep in (True, False):
            by_codes[lockstep] = _drive(mimi.encode_step, mimi.init_state(3), sources, FRAME, lockstep)
        alone = {c: mimi.encode(sources[c][..., : FRAME * codes.shape[-1]]) for c, codes in by_codes[False].items()}
        frames = {c: codes.shape[-1] for c, codes in alone.items()}
        assert frames == {"a": 3, "b": 8, "c": 4, "d": 4, "e": 6, "f": 5, "g": 3}  # pauses, joins, leaves
        for c, codes in alone.items():
            assert torch.equal(by_codes[True][c], codes), c
            assert torch.equal(by_codes[False][c], codes), c

        by_wav = {}
        for lockstep in (True, False):
            by_wav[lockstep] = _drive(mimi.decode_step, mimi.init_state(3), alone, 1, lockstep)
        for c, codes in alone.items():
            expected = mimi.decode(codes)
            torch.testing.assert_close(by_wav[True][c], expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(by_wav[False][c], expected, rtol=0, atol=1e-5)


def _stream_state(state, stream: int) -> list[torch.Tensor]:
    """Copies of one stream's state: conv histories, and the caches' bookkeeping (an inactive
    stream's keys and values may be written where its next real step writes first)."""
    parts = StateGroup([state.encoder.seanet, state.encoder.downsample, state.decoder.upsample,
                        state.decoder.seanet]).tensors()
    for cache in (state.encoder.transformer, state.decoder.transformer):
        parts += [cache.positions, cache.offset]
    return [t[stream].clone() for t in parts]


def test_inactive_streams_keep_their_state(mimi, sources, kernels):
    with torch.inference_mode():
        state = mimi.init_state(2)
        wav = torch.cat([sources["a"], sources["b"]])[..., : 3 * FRAME]
        mimi.decode_step(mimi.encode_step(wav, state), state)
        before = _stream_state(state, 1)
        active = torch.tensor([True, False])
        for frame in wav.split(FRAME, dim=-1):
            mimi.decode_step(mimi.encode_step(frame, state, active=active), state, active=active)
        for old, new in zip(before, _stream_state(state, 1)):
            assert torch.equal(old, new)
        assert not all(torch.equal(old, new) for old, new in zip(_stream_state(state, 0), before))


def test_active_mask_is_checked(mimi):
    state = mimi.init_state(2)
    wav = torch.zeros(2, 1, FRAME)
    with pytest.raises(InvalidParameterError, match=r"`active` must be \[2\] bool"):
        mimi.encode_step(wav, state, active=torch.tensor([True]))
    with pytest.raises(InvalidParameterError, match="without `rows`"):
        mimi.encode_step(wav[:1], state, rows=torch.tensor([0]), active=torch.tensor([True, False]))
    with pytest.raises(InvalidParameterError, match="bool"):
        mimi.decode_step(torch.zeros(2, 8, 1, dtype=torch.long), state, active=torch.tensor([1, 0]))


def test_full_size_lockstep_equals_alone(our_mimi, shared_audio):
    """The official config (its ring cache does not wrap in a few frames, but its kernels and
    sizes are the real ones): two streams, one leaving for two frames."""
    from moshi_core.formats.audio import load_audio

    clip = load_audio(shared_audio / "en_question_24k.wav")[None, :, : FRAME * 6]
    audio = torch.cat([clip, clip.flip(-1) * 0.5])
    masks = [[True, True], [True, False], [True, False], [True, True], [True, True], [True, True]]
    with torch.inference_mode():
        state = our_mimi.init_state(2)
        got = [our_mimi.encode_step(f, state, active=torch.tensor(m)) for f, m in zip(audio.split(FRAME, -1), masks)]
        assert torch.equal(torch.cat(got, -1)[:1], our_mimi.encode(clip))
        taken = torch.cat([audio[1:, :, i * FRAME : (i + 1) * FRAME] for i in (0, 3, 4, 5)], -1)
        assert torch.equal(torch.cat([got[i][1:] for i in (0, 3, 4, 5)], -1), our_mimi.encode(taken))

"""Our Mimi on its own: batching, per-slot reset, chunking, lengths, input checks."""

import pytest
import torch

from moshi_core.errors import InvalidParameterError


@pytest.fixture(scope="module")
def clip(shared_audio):
    from moshi_core.formats.audio import load_audio

    return load_audio(shared_audio / "en_question_24k.wav")[None, :, : 1920 * 20]  # [1, 1, T]


def test_batch_equals_items(our_mimi, clip):
    other = clip.flip(-1) * 0.5
    with torch.inference_mode():
        batch = our_mimi.encode(torch.cat([clip, other]))
        assert torch.equal(batch[:1], our_mimi.encode(clip))
        assert torch.equal(batch[1:], our_mimi.encode(other))


def test_reset_restarts_one_conversation_only(our_mimi, clip):
    """Slot 1 switches to a new stream mid-way; slot 0 carries on undisturbed."""
    frames = clip.split(1920, dim=-1)
    with torch.inference_mode():
        state = our_mimi.init_state(2)
        for f in frames[:7]:
            our_mimi.encode_step(torch.cat([f, f]), state)
        state.reset(torch.tensor([False, True]))
        rest = torch.cat([our_mimi.encode_step(torch.cat([f, f]), state) for f in frames[7:]], dim=-1)
        whole = our_mimi.encode(clip)
        fresh = our_mimi.encode(torch.cat(frames[7:], dim=-1))
    assert torch.equal(rest[:1], whole[..., 7:])
    assert torch.equal(rest[1:], fresh)


def test_decode_reset_restarts_one_slot(our_mimi, clip):
    with torch.inference_mode():
        codes = our_mimi.encode(clip)
        state = our_mimi.init_state(2)
        our_mimi.decode_step(torch.cat([codes[..., :5]] * 2), state)
        state.reset(torch.tensor([True, False]))
        out = our_mimi.decode_step(torch.cat([codes[..., 5:]] * 2), state)
        torch.testing.assert_close(out[:1], our_mimi.decode(codes[..., 5:]), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1:], our_mimi.decode(codes)[..., 5 * 1920:], rtol=0, atol=1e-5)


def _stepped_in_subsets(step, inputs: list[torch.Tensor], per_frame: int, schedule: list) -> list[torch.Tensor]:
    """Step three streams by `schedule` (the rows of each call, None for all); stream s takes
    the next `per_frame` columns of inputs[s] whenever it is stepped. Returns each one's output."""
    taken, outputs = [0] * 3, [[] for _ in range(3)]
    for rows in schedule:
        streams = [0, 1, 2] if rows is None else rows
        x = torch.cat([inputs[s][..., taken[s] : taken[s] + per_frame] for s in streams])
        y = step(x, None if rows is None else torch.tensor(rows))
        for i, s in enumerate(streams):
            outputs[s].append(y[i : i + 1])
            taken[s] += per_frame
    return [torch.cat(o, dim=-1) for o in outputs]


def test_rows_step_only_their_streams(our_mimi, clip):
    """Streams stepped in subsets (a live server's conversations in progress), in any order,
    get what they get alone; the others' state waits where it was."""
    schedule = [[0]] * 3 + [[2, 0]] * 4 + [None] * 5 + [[1]] * 2
    audio = [clip, clip.flip(-1) * 0.5, clip * 0.7]
    with torch.inference_mode():
        state = our_mimi.init_state(3)
        codes = _stepped_in_subsets(lambda x, rows: our_mimi.encode_step(x, state, rows=rows), audio, 1920, schedule)
        alone = [our_mimi.encode(a[..., : c.shape[-1] * 1920]) for a, c in zip(audio, codes)]
        assert [c.shape[-1] for c in codes] == [12, 7, 9]
        for got, expected in zip(codes, alone):
            assert torch.equal(got, expected)

        state = our_mimi.init_state(3)
        wavs = _stepped_in_subsets(lambda x, rows: our_mimi.decode_step(x, state, rows), alone, 1, schedule)
        for got, c in zip(wavs, alone):
            torch.testing.assert_close(got, our_mimi.decode(c), rtol=0, atol=1e-5)
        with pytest.raises(InvalidParameterError, match="batch of 2 for the 1 streams stepped"):
            our_mimi.decode_step(torch.cat([alone[0][..., :1]] * 2), state, torch.tensor([1]))


@pytest.mark.parametrize("frames_per_call", [2, 3])
def test_multi_frame_calls_equal_offline(our_mimi, clip, frames_per_call):
    with torch.inference_mode():
        state = our_mimi.init_state(1, max_frames=2)
        codes = torch.cat([our_mimi.encode_step(c, state) for c in clip.split(1920 * frames_per_call, dim=-1)], -1)
        assert torch.equal(codes, our_mimi.encode(clip))


def test_partial_frame_is_zero_padded_offline(our_mimi, clip):
    short = clip[..., : 1920 * 3 + 100]
    padded = torch.nn.functional.pad(short, (0, 1920 - 100))
    with torch.inference_mode():
        codes = our_mimi.encode(short)
        assert codes.shape[-1] == 4
        assert torch.equal(codes, our_mimi.encode(padded))
        assert our_mimi.decode(codes).shape[-1] == 4 * 1920


def test_codes_of_any_integer_type_decode_alike(our_mimi, clip):
    """A byte tensor of codes is codes, not a mask."""
    with torch.inference_mode():
        codes = our_mimi.encode(clip[..., : 1920 * 4]).clamp(max=255)
        audio = our_mimi.decode(codes)
        for dtype in (torch.int32, torch.int16, torch.uint8):
            assert torch.equal(our_mimi.decode(codes.to(dtype)), audio)


def test_progress_is_reported(our_mimi):
    seen = []
    with torch.inference_mode():
        our_mimi.encode(torch.zeros(1, 1, 1920 * 130), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(125, 130), (130, 130)]  # one report per 10 s chunk


def test_bad_inputs_are_refused(our_mimi):
    state = our_mimi.init_state(1)
    with pytest.raises(InvalidParameterError, match="whole frames"):
        our_mimi.encode_step(torch.zeros(1, 1, 1000), state)
    with pytest.raises(InvalidParameterError, match=r"\[batch, 1, samples\]"):
        our_mimi.encode(torch.zeros(1, 2, 1920))
    with pytest.raises(InvalidParameterError, match="empty"):
        our_mimi.encode(torch.zeros(1, 1, 0))
    with pytest.raises(InvalidParameterError, match="between 1 and 32"):
        our_mimi.encode(torch.zeros(1, 1, 1920), num_codebooks=33)
    with pytest.raises(InvalidParameterError, match="integers"):
        our_mimi.decode(torch.zeros(1, 8, 2))
    with pytest.raises(InvalidParameterError, match="state of 1 streams"):
        our_mimi.decode_step(torch.zeros(2, 8, 1, dtype=torch.long), state)


def test_config_accepts_the_official_keys():
    from moshi.models import loaders

    from moshi_core.models.mimi import MimiConfig

    official = {"seanet": loaders._seanet_kwargs, "transformer": loaders._transformer_kwargs,
                "quantizer": loaders._quantizer_kwargs, "sample_rate": 24000, "channels": 1, "frame_rate": 12.5}
    assert MimiConfig.from_dict(official) == MimiConfig()
    with pytest.raises(TypeError, match="unexpected keyword"):
        MimiConfig.from_dict({"seanet": dict(loaders._seanet_kwargs, n_filterz=64)})

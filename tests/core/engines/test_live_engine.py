"""The batched live engine against lone sessions built by hand from Mimi and `LMGenerator`."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from moshi_core.engines.live import LiveEngine
from moshi_core.engines.slots import SlotTable
from moshi_core.errors import InvalidParameterError, LiveBusyError
from moshi_core.formats.audio import load_audio
from moshi_core.formats.text import WORD_START
from moshi_core.inference.generate import LMGenerator
from moshi_core.params import SamplingParams

STEPS = 10
HOT = SamplingParams(temp=1.0, temp_text=1.0)


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def speech(shared_audio) -> list[np.ndarray]:
    """Two different user inputs of STEPS frames each."""
    wav = load_audio(shared_audio / "en_question_24k.wav")[0].numpy()
    frames = wav[: 2 * STEPS * 1920].reshape(2 * STEPS, 1920)
    return [frames[:STEPS], frames[STEPS:]]


def lone_session(models, frames, sampling: SamplingParams, seed: int) -> tuple[list[str], list[np.ndarray]]:
    """One conversation alone, following Kyutai's server: the first frame is
    stepped and ignored, then Mimi starts afresh. Returns the text pieces and audio frames."""
    mimi, lm, tokenizer = models.mimi, models.lm, models.tokenizer
    gen = LMGenerator(lm, sampling, seed=seed)
    state, codec = gen.init_state(1), mimi.init_state(1)
    texts, audio = [], []
    with torch.inference_mode():
        for t, frame in enumerate(frames):
            wav = torch.zeros(1, 1, 1920) if frame is None else torch.from_numpy(frame)[None, None]
            out = gen.step(mimi.encode_step(wav, codec, 8), state)
            token = int(out[0, 0])
            piece = tokenizer.piece(token) if token not in (0, 3) else None
            texts.append("" if piece is None else piece.replace(WORD_START, " "))
            if t == 0:
                codec.reset()
            else:
                audio.append(mimi.decode_step(out[:, 1:, None], codec)[0, 0].numpy())
    return texts, audio


def run(engine, inputs: dict[int, list]) -> dict[int, list]:
    outputs = {slot: [] for slot in inputs}
    for t in range(max(len(f) for f in inputs.values())):
        step = engine.step({slot: frames[t] for slot, frames in inputs.items() if t < len(frames)})
        for slot in inputs:
            outputs[slot].append(step[slot])
    return outputs


def assert_same_conversation(frames, expected):
    texts, audio = expected
    assert [f.text for f in frames] == texts
    assert frames[0].audio is None
    got = np.stack([f.audio for f in frames[1:]])
    np.testing.assert_allclose(got, np.stack(audio), atol=1e-4)


def test_batched_slots_equal_lone_sessions(models, speech):
    engine = LiveEngine(models, slots=3)
    a = engine.open(HOT, seed=5)
    b = engine.open(SamplingParams.greedy())
    assert engine.step({}) == {}  # a conversation starts with its first frame
    out = run(engine, {a: speech[0], b: speech[1]})  # the third slot stays free
    hot = lone_session(models, speech[0], HOT, 5)
    assert_same_conversation(out[a], hot)
    assert_same_conversation(out[b], lone_session(models, speech[1], SamplingParams.greedy(), 0))
    assert sum(1 for f in out[a] if f.text) > 2  # text comes out
    assert np.abs(np.stack([f.audio for f in out[a][1:]])).max() > 1e-3  # and sound
    # The same input with another seed gives another conversation.
    assert [f.text for f in out[a]] != lone_session(models, speech[0], HOT, 6)[0]


def test_one_more_than_the_slots_is_refused(models):
    engine = LiveEngine(models, slots=2)
    first, second = engine.open(), engine.open()
    with pytest.raises(LiveBusyError, match="all 2 conversation slots are in use"):
        engine.open()
    engine.close(first)
    assert engine.open() == first and engine.open_slots == [first, second]
    with pytest.raises(InvalidParameterError):
        LiveEngine(models, slots=0)


def test_slots_join_and_leave_without_disturbing_each_other(models, speech):
    """Slot 0 talks throughout; slot 1's caller leaves halfway and a new one takes the slot:
    slot 0 sees nothing of it, and the newcomer starts clean (and missing frames are silence)."""
    engine = LiveEngine(models, slots=2)
    keep = engine.open(HOT, seed=1)
    leaving = engine.open(HOT, seed=2)
    half = STEPS // 2
    kept, left = [], []
    for t in range(half):
        step = engine.step({keep: speech[0][t], leaving: speech[1][t]})
        kept.append(step[keep])
        left.append(step[leaving])
    engine.close(leaving)
    newcomer = engine.open(HOT, seed=3)
    assert newcomer == leaving
    new_input = [None if t % 3 == 1 else speech[1][t] for t in range(STEPS - half)]  # frames lost
    joined = []
    for t in range(half, STEPS):
        step = engine.step({keep: speech[0][t], newcomer: new_input[t - half]})
        kept.append(step[keep])
        joined.append(step[newcomer])
    assert_same_conversation(kept, lone_session(models, speech[0], HOT, 1))
    assert_same_conversation(joined, lone_session(models, new_input, HOT, 3))


@pytest.mark.slow  # test-fast checks the free rows' states per component (test_mimi.py, test_transformer_active.py)
def test_only_conversations_in_progress_are_stepped(models, speech):
    """Free slots and a conversation that has not started cost nothing: neither Mimi's nor the
    LM's state of their rows moves, and the one in progress is the lone session."""
    engine = LiveEngine(models, slots=3)
    talking, waiting = engine.open(HOT, seed=4), engine.open(HOT, seed=5)
    frames = []
    for t in range(STEPS):
        step = engine.step({talking: speech[0][t], waiting: None})
        assert list(step) == [talking]  # the other has sent nothing yet: not started
        frames.append(step[talking])
    assert_same_conversation(frames, lone_session(models, speech[0], HOT, 4))
    # Mimi's first step is reset away (see the engine): STEPS - 1 steps on the talking row.
    assert engine._mimi_state.encoder.transformer.offset.tolist() == [2 * (STEPS - 1), 0, 0]
    assert engine._mimi_state.decoder.transformer.offset.tolist() == [2 * (STEPS - 1), 0, 0]
    assert engine._lm_state.offsets.tolist() == [STEPS, 0, 0]


def test_a_frame_of_the_wrong_size_ends_its_conversation(models):
    engine = LiveEngine(models, slots=1)
    slot = engine.open()
    out = engine.step({slot: np.zeros(960, np.float32)})
    assert "1920 samples" in out[slot].error and out[slot].audio is None
    assert engine.step({slot: np.zeros(1920, np.float32)}) == {}  # ended: never stepped again


@dataclass
class Occupant:
    sampling: SamplingParams
    seed: int | None


def test_the_slot_table_seats_releases_and_steps_every_slot_without_rows():
    table = SlotTable(3, "test engine")
    first, second, third = (Occupant(HOT, seed) for seed in (1, 2, 3))
    assert [table.seat(first), table.seat(second), table.seat(third)] == [0, 1, 2]
    assert table.seat(Occupant(HOT, 4)) is None  # busy
    table.release(1)
    assert table.occupied() == [(0, first), (2, third)] and table[1] is None
    assert table.batch([0, 2], lockstep=False).rows("cpu").tolist() == [0, 2]
    assert table.mask([2]).tolist() == [False, False, True]
    assert table.seat(second) == 1
    assert table.batch([0, 1, 2], lockstep=False).rows("cpu") is None  # all slots step: no gather of their rows
    with pytest.raises(InvalidParameterError, match="a test engine needs at least 1 slot"):
        SlotTable(0, "test engine")


def test_joining_configures_and_resets_only_the_joining_slots(models):
    gen = LMGenerator(models.lm, HOT)
    table = SlotTable(2, "test engine")
    table.seat(Occupant(HOT, 1))
    table.seat(Occupant(SamplingParams.greedy(), 2))
    with torch.inference_mode():  # as the engines do: the state is updated in place
        state = gen.init_state(2, per_slot_sampling=True)
        state.offsets.fill_(7)
        table.join([1], state)
    assert state.offsets.tolist() == [7, 0]
    assert state.slots.params[1] == SamplingParams.greedy() and state.slots.params[0] != HOT

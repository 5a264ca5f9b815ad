"""The batched live STT engine: streams stepped in any mix give each stream's own transcript.

Tiny random STT weights (the 1B's config, its voice-activity heads); the reference for a
stream is `LiveTranscription`, the one-stream streaming path, on the same audio.
"""

import numpy as np
import pytest
import torch
from oracle import write_stt_folder

from moshi_core.engines.transcription import TranscriptionEngine
from moshi_core.errors import LiveBusyError
from moshi_core.formats.audio import load_audio
from moshi_core.inference.stt import LiveTranscription, Transcriber, load_stt

FRAME = 1920
pytestmark = pytest.mark.slow  # a few hundred STT steps


@pytest.fixture(scope="module")
def stt(tmp_path_factory, mimi_checkpoint, tokenizer_model):
    folder = tmp_path_factory.mktemp("stt-1b")
    write_stt_folder(folder, "stt-1b-en_fr", mimi_checkpoint, tokenizer_model)
    return load_stt(str(folder), dtype=torch.float32)


@pytest.fixture(scope="module")
def clips(shared_audio) -> list[np.ndarray]:
    wav = load_audio(shared_audio / "en_question_24k.wav")[0].numpy()
    return [wav[: 24 * FRAME], wav[24 * FRAME : 40 * FRAME]]


def alone(stt, clip: np.ndarray) -> list:
    live = LiveTranscription(Transcriber(stt))
    live.feed(torch.from_numpy(clip)[None])
    live.finish()
    return live.words


def test_streams_stepped_in_any_mix_transcribe_as_each_alone(stt, clips):
    engine = TranscriptionEngine(stt, slots=3)
    assert engine.has_voice_activity
    a, b = engine.open(), engine.open()
    words = {a: [], b: []}
    frames = {slot: clip.reshape(-1, FRAME) for slot, clip in zip((a, b), clips)}
    # b joins late and pauses now and then: only the streams with a frame are stepped.
    for t in range(len(frames[a])):
        step = {a: frames[a][t]}
        if t >= 5 and t % 3 and (t - 5) < len(frames[b]) * 3 // 2:
            step[b] = frames[b][sum(1 for u in range(5, t) if u % 3)]
        for slot, result in engine.step(step).items():
            words[slot] += result.words
            assert result.pause is not None and 0 <= result.pause <= 1
    fed_b = sum(1 for u in range(5, len(frames[a])) if u % 3 and (u - 5) < len(frames[b]) * 3 // 2)
    for frame in frames[b][fed_b:]:
        words[b] += engine.step({b: frame})[b].words
    words[a] += engine.finish(a)
    words[b] += engine.finish(b)
    assert words[a] == alone(stt, clips[0]) and words[a]
    assert words[b] == alone(stt, clips[1])


def test_a_finished_stream_leaves_nothing_to_the_next_and_slots_run_out(stt, clips):
    engine = TranscriptionEngine(stt, slots=1)
    slot = engine.open()
    with pytest.raises(LiveBusyError, match="1 transcription slots"):
        engine.open()
    for clip in clips:
        words = []
        for frame in clip.reshape(-1, FRAME):
            words += engine.step({slot: frame})[slot].words
        words += engine.finish(slot)  # the slot starts afresh: the second clip is transcribed as if alone
        assert words == alone(stt, clip)
    engine.close(slot)
    assert engine.open() == slot

"""Our TTS against Kyutai's (`moshi==0.2.13`) on the same random weights and voices.

Greedy decoding makes every choice a deterministic argmax, so the text the model feeds
itself, every audio code and every word's step must be identical, and the audio decoded
from them must match to float32 rounding.
"""

import pytest
import torch
from tts_oracle import SUFFIX, VOICES, reference_tts, tiny_tts  # noqa: F401 (fixture)

from moshi_core.inference.tts import SKIPPED_FRAMES

TEXTS = ("hello how are you", "bonjour: <break time=\"0.3s\"/> paris")
# Random weights rarely choose "new word": the state machine then forces one after
# `max_padding` pads. A small value keeps the test short; it is a setting of both sides.
MAX_PADDING = 2


def run_reference(ref, voices, texts, names):
    entries = [ref.prepare_script([t], padding_between=1) for t in texts]
    attributes = [ref.make_condition_attributes([voices / (n + SUFFIX)], cfg_coef=2.0) for n in names]
    with torch.no_grad():
        result = ref.generate(entries, attributes)
    return result


def run_ours(folder, voices, texts, names):
    from moshi_core.inference.tts import TTSRequest, TTSSession, load_tts
    from moshi_core.params import TTSParams

    model = load_tts(folder, voices=voices, dtype=torch.float32)
    params = TTSParams(temp=0.0, cfg_coef=2.0, max_padding=MAX_PADDING)
    session = TTSSession(model, [TTSRequest(t, n, params) for t, n in zip(texts, names)])
    chunks = list(session.stream())
    return session, chunks


@pytest.fixture(scope="module")
def both(tiny_tts):  # noqa: F811
    folder, voices = tiny_tts
    names = list(VOICES)
    ref = reference_tts(folder, voices, max_padding=MAX_PADDING)
    return ref, run_reference(ref, voices, TEXTS, names), run_ours(folder, voices, TEXTS, names)


def test_greedy_tokens_and_word_steps_match_the_reference(both):
    _, result, (session, _) = both
    ref_frames = torch.cat(result.frames, dim=-1)  # [B, 1 + 32, T]
    ours = torch.stack(session.frames, dim=-1)
    assert ours.shape == ref_frames.shape
    for i in range(len(TEXTS)):  # a request stops stepping once its audio is out (Kyutai's goes on)
        used = session.end_step(i) + SKIPPED_FRAMES + session.model.delay_steps
        assert torch.equal(ours[i, :, :used], ref_frames[i, :, :used])
    assert max(session.end_step(i) + SKIPPED_FRAMES + session.model.delay_steps for i in range(len(TEXTS))) \
        >= ours.shape[-1]  # the last to finish: every frame
    # The text stream is what the state machine fed: words, look-ahead, pads; not all pads.
    assert (ours[:, 0] > 64).any() and (ours[:, 1:, 20:] >= 0).all()
    for i in range(len(TEXTS)):
        assert session.items[i].feed.word_steps == [tuple(w) for w in result.all_transcripts[i]]
        assert session.end_step(i) == result.end_steps[i] is not None


def test_audio_and_word_times_match_the_reference_decoding(both):
    ref, result, (session, chunks) = both
    delay = ref.delay_steps
    with ref.mimi.streaming(len(TEXTS)), torch.no_grad():
        pcms = [ref.mimi.decode(f[:, 1:, :]).clamp(-1, 1) for f in result.frames[delay:]]
    pcms = pcms[2:]  # as Kyutai's simple_generate
    for i in range(len(TEXTS)):
        expected = torch.cat([p[i, 0] for p in pcms[: result.end_steps[i]]])
        ours = torch.cat([c.pcm for c in chunks if c.request == i])
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
        assert sum(c.done for c in chunks if c.request == i) == 1 and [c for c in chunks if c.request == i][-1].done
        words = session.words(i)
        steps = [s for _, s in result.all_transcripts[i]]
        assert [w.text for w in words] == [w for w, _ in result.all_transcripts[i]]
        assert [w.start for w in words] == [max(0, s - 2) / 12.5 for s in steps]


def test_a_request_says_the_same_alone_or_in_a_batch(tiny_tts):  # noqa: F811
    """Sampled (not greedy): each request has its own seeded generator and its own cache rows."""
    from moshi_core.inference.tts import TTSRequest, TTSSession, load_tts
    from moshi_core.params import TTSParams

    folder, voices = tiny_tts
    model = load_tts(folder, voices=voices, dtype=torch.float32)
    requests = [TTSRequest(TEXTS[0], VOICES[0], TTSParams(seed=11, max_padding=MAX_PADDING)),
                TTSRequest(TEXTS[1], VOICES[1], TTSParams(seed=12, max_padding=MAX_PADDING))]
    batch, alone = TTSSession(model, requests), TTSSession(model, requests[1:])
    batch_pcm = torch.cat([c.pcm for c in batch.stream() if c.request == 1])
    alone_pcm = torch.cat([c.pcm for c in alone.stream()])
    n = len(alone.frames)
    assert torch.equal(torch.stack(batch.frames[:n])[:, 1], torch.stack(alone.frames)[:, 0])
    assert batch.words(1) == alone.words(0) and batch.end_step(1) == alone.end_step(0)
    torch.testing.assert_close(batch_pcm, alone_pcm, atol=1e-4, rtol=1e-4)

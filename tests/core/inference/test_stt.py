"""Speech-to-text against Kyutai's reference on random weights, at both STT configs (2 layers).

Checkpoints are written in the official format, with a config.json laid out like the HF
repos', and loaded through the user's code path; the reference `LMGen` (greedy) is fed the
same Mimi codes, one step at a time, with the same silence around the speech.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from oracle import STT_CONFIGS, write_stt_folder

from moshi_core.errors import ModelSourceError
from moshi_core.formats.audio import load_audio
from moshi_core.formats.text import Word
from moshi_core.inference.stt import Transcriber, load_stt


@pytest.fixture(scope="module")
def stt_factory(tmp_path_factory, mimi_checkpoint, tokenizer_model):
    made = {}

    def make(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            reference = write_stt_folder(folder, name, mimi_checkpoint, tokenizer_model)
            made[name] = name, folder, reference, load_stt(str(folder), dtype=torch.float32)
        return made[name]

    return make


# Both configs in the full suite; `make test-fast` keeps the 1B, the one with voice-activity heads.
@pytest.fixture(scope="module", params=[name if name == "stt-1b-en_fr" else pytest.param(name, marks=pytest.mark.slow)
                                        for name in sorted(STT_CONFIGS)])
def stt(request, stt_factory):
    return stt_factory(request.param)


def reference_words(tokens: list[int], sp, frame_rate: float, offset: float) -> list[Word]:
    """Kyutai's word rule (`stt_from_file_pytorch.py`) on whole token lists."""
    tokens = torch.tensor(tokens)

    def time(frame):
        return max(0.0, frame / frame_rate - offset)

    words = []

    def segment(start, end):
        text = sp.decode([t for t in tokens[start:end].tolist() if t > 3])
        names = text.split()
        for name in names[:-1]:
            n = len(sp.encode(name))
            words.append(Word(name, time(start), time(start + n)))
            start += n
        if names:
            words.append(Word(names[-1], time(start), time(end)))

    (bounds,) = torch.where(tokens == 0)
    if not len(bounds):
        return []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        segment(a + 1, b)
    last = int(bounds[-1]) + 1
    (eos,) = torch.where(tokens[last:] == sp.eos_id())
    segment(last, last + int(eos[0]) if len(eos) else int(min(len(tokens), last + frame_rate)))
    return words


def test_greedy_tokens_heads_and_words_equal_the_reference(stt, shared_audio):
    from moshi.models.lm import LMGen

    name, _, reference, models = stt
    transcriber = Transcriber(models)
    # Every shared speech file (their first 3 s: 16 kHz, 44.1 kHz stereo, mp3 included) in one batch.
    files = sorted(p for p in shared_audio.iterdir() if p.suffix in (".wav", ".mp3"))
    speech = [load_audio(f)[:, : 3 * 24000] for f in files]
    assert len(speech) >= 5
    ours = transcriber.transcribe(speech)

    # The same padded input, encoded by our Mimi (proven equal to the reference's elsewhere).
    frames = -(-max(w.shape[-1] for w in speech) // 1920)
    total = transcriber.prefix_frames + frames + transcriber.tail_frames
    batch = torch.zeros(len(speech), 1, total * 1920)
    for i, w in enumerate(speech):
        batch[i, :, transcriber.prefix_frames * 1920 :][..., : w.shape[-1]] = w
    with torch.inference_mode():
        codes = models.mimi.encode(batch, 32)
    lm_gen = LMGen(reference, use_sampling=False, temp=0.0, temp_text=0.0)
    ref_tokens, ref_heads = [], []
    with torch.no_grad(), lm_gen.streaming(len(speech)):
        for t in range(total):
            out, heads = lm_gen.step_with_extra_heads(codes[..., t : t + 1])
            ref_tokens.append(out[:, 0, 0])
            ref_heads.append(torch.stack([h[:, 0, 0] for h in heads], dim=1) if heads else None)  # [B, heads]
    ref_tokens = torch.stack(ref_tokens, dim=1)
    assert [t.tokens for t in ours] == ref_tokens.tolist()
    assert len(set(ref_tokens.flatten().tolist())) > 5, "the random model should not be stuck on one token"

    sp = models.tokenizer.sp
    for item, transcript in enumerate(ours):
        expected = reference_words(ref_tokens[item].tolist(), sp, 12.5, transcriber.offset_seconds)
        assert transcript.words == expected
    assert any(t.words for t in ours), "the test should exercise word boundaries"

    if name == "stt-1b-en_fr":  # the voice-activity heads
        state = transcriber.init_state(len(speech))
        pause = []
        for t in range(total):
            pause.append(transcriber._step_codes(codes[..., t : t + 1], state).pause)
        expected = torch.stack(ref_heads, dim=1)
        torch.testing.assert_close(torch.stack(pause, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_streaming_equals_offline_and_slots_reset_alone(stt, shared_audio):
    _, _, _, models = stt
    transcriber = Transcriber(models)
    wav = load_audio(shared_audio / "en_short_16k.wav")
    (offline,) = transcriber.transcribe([wav])
    frames = -(-wav.shape[-1] // 1920)
    padded = torch.zeros(1, 1, (transcriber.prefix_frames + frames + transcriber.tail_frames) * 1920)
    padded[..., transcriber.prefix_frames * 1920 :][..., : wav.shape[-1]] = wav
    # Slot 1 runs other audio first, then is reset and given the same file as slot 0.
    noise = torch.randn(1, 1, padded.shape[-1]) * 0.1
    state = transcriber.init_state(2)
    tokens = [[], []]
    for t in range(0, padded.shape[-1], 1920):
        both = torch.cat([padded[..., t : t + 1920], noise[..., t : t + 1920]])
        result = transcriber.step(both, state)
        tokens[0].append(int(result.tokens[0]))
    assert tokens[0] == offline.tokens
    transcriber.reset(state, torch.tensor([False, True]))
    for t in range(0, padded.shape[-1], 1920):
        result = transcriber.step(torch.cat([noise[..., t : t + 1920], padded[..., t : t + 1920]]), state)
        tokens[1].append(int(result.tokens[1]))
    assert tokens[1] == offline.tokens
    assert state.words[1].flush() == offline.words


def test_a_moshi_folder_is_not_an_stt_model(tiny_moshi):
    with pytest.raises(ModelSourceError, match="is not a speech-to-text model"):
        load_stt(str(tiny_moshi), dtype=torch.float32)


@pytest.mark.e2e  # the installed command
def test_cli_transcribe_formats(stt_factory, shared_audio, tmp_path):
    _, folder, _, models = stt_factory("stt-1b-en_fr")
    speech = shared_audio / "en_question_24k.wav"
    (expected,) = Transcriber(models).transcribe([load_audio(speech)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "moshi_core", "transcribe", str(speech), "--model", str(folder),
                               "--dtype", "float32", *args], capture_output=True, text=True, env=env, check=True)

    data = json.loads(run("--format", "json").stdout)
    assert data["text"] == expected.text
    assert [w["text"] for w in data["words"]] == [w.text for w in expected.words]
    srt = run("--format", "srt", "-o", str(tmp_path / "out.srt"))
    assert srt.stdout == "" and (tmp_path / "out.srt").read_text().startswith("1\n00:00:")
    assert run("--format", "vtt").stdout.startswith("WEBVTT\n\n")
    assert run("--format", "text").stdout.strip() == expected.text


@pytest.mark.e2e  # a real server
def test_transcription_job_and_openai_endpoint(stt_factory, shared_audio, tmp_path):
    import httpx
    import openai
    from servers import start_api

    _, folder, _, models = stt_factory("stt-1b-en_fr")
    speech = shared_audio / "en_question_24k.wav"
    (expected,) = Transcriber(models).transcribe([load_audio(speech)])
    env = {**os.environ, "MOSHI_STT_MODEL": str(folder), "MOSHI_DTYPE": "float32", "MOSHI_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "MOSHI_STORAGE_DIR": str(tmp_path / "jobs"), "MOSHI_SYNC_MAX_SECONDS": "10"}
    env.pop("REDIS_URL", None)
    api, url = start_api(env, tmp_path)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        with open(speech, "rb") as f:
            verbose = client.audio.transcriptions.create(model=str(folder), file=f, response_format="verbose_json",
                                                         timestamp_granularities=["word", "segment"])
        assert verbose.text == expected.text
        assert [(w.word, w.start, w.end) for w in verbose.words] == [(w.text, w.start, w.end) for w in expected.words]
        assert verbose.duration == pytest.approx(6.9, abs=0.01)
        with open(speech, "rb") as f:
            srt = client.audio.transcriptions.create(model=str(folder), file=f, response_format="srt")
        assert srt.startswith("1\n00:00:") if expected.words else srt == ""
        with open(speech, "rb") as f:
            with pytest.raises(openai.NotFoundError, match="this server transcribes with"):
                client.audio.transcriptions.create(model="whisper-9", file=f)
        with open(shared_audio / "en_long_24k.wav", "rb") as f:
            with pytest.raises(openai.APIStatusError, match="POST /v1/transcriptions") as too_long:
                client.audio.transcriptions.create(model=str(folder), file=f)
        assert too_long.value.status_code == 413

        # The same file as a job: JSON, SRT, WebVTT and text to download.
        with httpx.Client(base_url=url, timeout=30) as http:
            job = http.post("/v1/transcriptions", files={"file": ("long.wav", (shared_audio / "en_long_24k.wav")
                                                                   .read_bytes())}).json()
            while (job := http.get(f"/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
                time.sleep(0.2)
            assert job["state"] == "succeeded", job
            assert [a["name"] for a in job["artifacts"]] == ["transcript.json", "transcript.srt", "transcript.vtt",
                                                             "transcript.txt"]
            transcript = http.get(f"/v1/jobs/{job['id']}/result").json()
            assert transcript["duration"] == pytest.approx(16.1, abs=0.05) and "words" in transcript
            assert http.get(f"/v1/jobs/{job['id']}/artifacts/transcript.vtt").text.startswith("WEBVTT")
    except BaseException:
        print(api.output())
        raise
    finally:
        api.stop()


def test_live_transcription_in_odd_chunks_equals_the_file(stt_factory, shared_audio):
    import numpy as np

    from moshi_core.formats.audio import PcmStream
    from moshi_core.inference.stt import LiveTranscription

    _, _, _, models = stt_factory("stt-1b-en_fr")
    transcriber = Transcriber(models)
    wav = load_audio(shared_audio / "en_question_24k.wav")
    (offline,) = transcriber.transcribe([wav])
    live, pcm = LiveTranscription(transcriber), PcmStream(24000)
    int16 = (wav[0].numpy() * 32767).round().astype(np.int16)  # what a browser sends
    heard, start = [], 0
    for size in [700, 5000, 1920, 13, 9000] * 100:
        if start >= len(int16):
            break
        heard += live.feed(pcm(int16[start : start + size]))
        start += size
    heard += live.finish()
    assert heard == live.words
    assert live.text == offline.text  # int16 rounding did not change a greedy token here
    assert live.words == offline.words


@pytest.mark.e2e  # a real server
def test_transcribe_tab(stt_factory, mimi_checkpoint, tiny_moshi, shared_audio):
    from app_server import serve_app
    from gradio_client import Client, handle_file

    _, folder, _, models = stt_factory("stt-1b-en_fr")
    (expected,) = Transcriber(models).transcribe([load_audio(shared_audio / "en_question_24k.wav")])
    with serve_app(mimi_checkpoint, tiny_moshi, MOSHI_STT_MODEL=str(folder)) as url:
        client = Client(url, verbose=False)
        text, words, path = client.predict(handle_file(str(shared_audio / "en_question_24k.wav")), "vtt",
                                           api_name="/transcribe")
    assert text == expected.text
    assert words == [w.to_dict() for w in expected.words]
    assert open(path).read().startswith("WEBVTT")

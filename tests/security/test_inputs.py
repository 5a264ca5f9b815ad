"""Attacks through parameters and files: decoding bombs, TTS markup and voices, absurd numbers.

Each one was reproduced against the code before issue 15: a file small on disk that decodes
to gigabytes, text and voices that ended as a 500 or an `internal` job error, a voice that
made the server read a file or fetch a repo of the caller's choosing.
"""

import io
import os
import tracemalloc

import httpx
import numpy as np
import pytest
import soundfile as sf
from servers import REPO_DIR, start_api
from tts_oracle import SUFFIX, VOICES, tiny_tts  # noqa: F401 (fixture)

from api.errors import status_of
from moshi_core.errors import AudioTooLargeError, InvalidParameterError, ModelSourceError
from moshi_core.formats.audio import load_audio
from moshi_core.loading.hub import parse_source
from moshi_core.loading.voices import VoiceRepo

RATE, CHANNELS = 655_350, 8  # the highest rate FLAC takes, and 8 channels
MAX_AUDIO_SECONDS = 600


def flac(seconds: float, rate: int = RATE, channels: int = CHANNELS) -> bytes:
    """Silence as FLAC, written a second at a time: a few kB on disk per minute."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        block, left = np.zeros((rate, channels), np.int16), round(rate * seconds)
        while left > 0:
            f.write(block[: min(left, rate)])
            left -= rate
    return buffer.getvalue()


def announcing(data: bytes, frames: int) -> bytes:
    """The FLAC with its STREAMINFO total (the low 36 bits of its bytes 10..17) set to `frames`."""
    assert data[:4] == b"fLaC"
    start = 8 + 10  # after "fLaC" and the block header
    packed = int.from_bytes(data[start : start + 8], "big") & ~((1 << 36) - 1) | frames
    return data[:start] + packed.to_bytes(8, "big") + data[start + 8 :]


def peak_bytes_of(call) -> int:
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_minute_at_655_khz_on_8_channels_is_refused_before_decoding():
    data = flac(60)  # 343 kB that decoded to 1.2 GB of float32 (1.5 GB peak)
    assert len(data) < 400_000

    def decode():
        with pytest.raises(AudioTooLargeError, match=r"655350 Hz x 8 channels x 60.0 s.*the limit is 230.4 million"):
            load_audio(data, max_seconds=MAX_AUDIO_SECONDS)

    assert peak_bytes_of(decode) < 16 * 2**20


def test_a_header_announcing_599_s_at_655_khz_is_refused_without_allocating():
    data = announcing(flac(1), 599 * RATE)  # was an 11.7 GiB array asked for at once

    def decode():
        with pytest.raises(AudioTooLargeError, match="announces 3,140.4 million samples"):
            load_audio(data, max_seconds=MAX_AUDIO_SECONDS)

    assert peak_bytes_of(decode) < 16 * 2**20


def test_the_budget_follows_the_duration_limit_and_spares_ordinary_audio():
    with pytest.raises(AudioTooLargeError, match="the limit is 0.4 million"):
        load_audio(flac(0.5), max_seconds=1)  # 2.6 million samples for half a second
    stereo = load_audio(flac(1, 48_000, 2), max_seconds=1)  # 96 000 samples: well inside
    assert stereo.shape == (1, 24_000)
    assert status_of(AudioTooLargeError("too many samples")) == (413, "audio_too_large")


@pytest.mark.parametrize("uri", ["hf://../../x", "hf://a/b/../../etc/passwd", "hf://a--b/c/v.safetensors",
                                 "hf://a/b@../v.safetensors", "hf://a/b//v.safetensors", "hf://.a/b/v"])
def test_hf_uris_are_parsed_strictly(uri):
    with pytest.raises(ModelSourceError, match="hf://"):
        parse_source(uri)


def test_a_request_names_only_voices_of_the_voice_repo(tmp_path):
    folder = tmp_path / "voices"
    (folder / "vctk").mkdir(parents=True)
    (folder / "vctk" / f"p1{SUFFIX}").write_bytes(b"x")
    secret = tmp_path / f"secret{SUFFIX}"
    secret.write_bytes(b"x")
    repo = VoiceRepo(str(folder), SUFFIX)
    assert repo.path("vctk/p1") == folder / "vctk" / f"p1{SUFFIX}"
    missing = str(tmp_path / f"missing{SUFFIX}")
    for voice in (str(secret), missing, f"../secret{SUFFIX}", "hf://someone/any-repo/v.safetensors", "hf://../../x",
                  "vctk/nobody"):
        with pytest.raises(InvalidParameterError) as refused:
            repo.path(voice)
        assert str(folder) not in str(refused.value)
    # The same answer whether the file exists or not: nothing tells which files the server has.
    refusals = [str(pytest.raises(InvalidParameterError, repo.path, p).value).replace(p, "") for p in (str(secret), missing)]
    assert refusals[0] == refusals[1]
    assert repo.path(str(secret), allow_paths=True) == secret  # the CLI's own user may


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_tts, mimi_checkpoint, tiny_moshi):  # noqa: F811
    folder, voices = tiny_tts
    root = tmp_path_factory.mktemp("inputs-api")
    env = {**os.environ, "MOSHI_TTS_MODEL": str(folder), "MOSHI_TTS_VOICES": str(voices), "MOSHI_DTYPE": "float32",
           "MOSHI_MODELS": str(tiny_moshi), "MOSHI_MIMI": str(mimi_checkpoint), "MOSHI_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "MOSHI_STORAGE_DIR": str(root / "storage"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_DIR)}
    process, url = start_api(env, root)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, voices
    finally:
        process.stop()


BAD_TEXTS = [('hello <break time="1x5s"/> there', "break time '1x5s'"),
             ('hello <break time="1e999s"/> there', "break time '1e999s'"),
             ('hello <break time="2000s"/> there', "the breaks add up to 2000 s of silence; the audio limit is 600 s")]


@pytest.mark.e2e
@pytest.mark.parametrize("text, message", BAD_TEXTS, ids=["1x5s", "1e999s", "2000s"])
def test_bad_tts_markup_is_a_422_before_anything_is_queued(api, text, message):
    client, _ = api
    for path, body in (("/v1/tts", {"text": text}), ("/v1/audio/speech", {"model": "tts-1", "input": text,
                                                                          "voice": VOICES[0]})):
        response = client.post(path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_parameter" and message in response.json()["error"]["message"]
    assert client.get("/v1/jobs").json() == []  # nothing ran, nothing failed as internal


@pytest.mark.e2e
def test_tts_voices_outside_the_voice_repo_are_refused(api):
    client, voices = api
    inside = str(voices / (VOICES[1] + SUFFIX))  # a readable voice file, named by its server path
    for voice in (inside, "hf://someone/any-repo/v.safetensors", "hf://../../x", "/etc/hostname.safetensors"):
        response = client.post("/v1/tts", json={"text": "hello", "voice": voice})
        assert response.status_code == 422, (voice, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_parameter" and "voice repo" in error["message"], error
    assert client.get("/v1/jobs").json() == []


@pytest.mark.e2e
@pytest.mark.parametrize("max_seconds", ["inf", "1e308"])
def test_an_absurd_dialogue_max_seconds_is_a_422(api, shared_audio, max_seconds):
    client, _ = api
    audio = (shared_audio / "en_question_24k.wav").read_bytes()
    response = client.post("/v1/dialogue", files={"file": ("q.wav", audio, "audio/wav")},
                           data={"max_seconds": max_seconds})
    assert response.status_code == 422, response.text

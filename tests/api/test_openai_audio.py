"""OpenAI's own client on the OpenAI-compatible routes: the model list, transcription under
OpenAI's model names in every response format and streamed word by word, speech in every
format and speed, translation refused, and errors in OpenAI's shape.

The server runs as users run it (`python -m api`, jobs in-process) on tiny random-weight STT
and TTS folders, so the words are nonsense but real: what the model recognised.
"""

import io
import os
import warnings

import av
import httpx
import openai
import pytest
from oracle import write_stt_folder
from servers import REPO_DIR, running_api
from tts_oracle import VOICES, tiny_tts  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e  # a real server

STT_ALIASES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
SPEECH_FORMATS = ("mp3", "aac", "opus", "flac", "wav", "pcm")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tts, mimi_checkpoint, tokenizer_model):  # noqa: F811
    folder, voices = tiny_tts
    root = tmp_path_factory.mktemp("openai-audio")
    write_stt_folder(root / "stt", "stt-1b-en_fr", mimi_checkpoint, tokenizer_model)
    env = {**os.environ, "MOSHI_TTS_MODEL": str(folder), "MOSHI_TTS_VOICES": str(voices),
           "MOSHI_STT_MODEL": str(root / "stt"), "MOSHI_DTYPE": "float32", "MOSHI_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "MOSHI_STORAGE_DIR": str(root / "storage"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_DIR)}
    with running_api(env, root) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_list_names_the_models_and_openais_aliases(client):
    models = {m.id: m for m in client.models.list()}
    assert {"stt", "model"} <= set(models)  # the local STT and TTS folders, by their names
    assert {*STT_ALIASES, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= set(models)
    assert all(m.object == "model" and m.owned_by and isinstance(m.created, int) for m in models.values())
    assert models["whisper-1"].model_extra["alias_of"] == "stt" and models["tts-1"].model_extra["alias_of"] == "model"


def test_transcription_under_every_alias_and_in_every_format(client, shared_audio):
    audio = (shared_audio / "en_short_16k.wav").read_bytes()  # 0.77 s: 9 transcriptions stay cheap

    def transcribe(**options):
        return client.audio.transcriptions.create(file=("q.wav", audio), **options)

    text = transcribe(model="stt").text
    assert text.strip(), "the tiny model wrote no words: the checks below would prove nothing"
    for alias in STT_ALIASES:  # greedy decoding: the same words under each name
        assert transcribe(model=alias).text == text
    assert transcribe(model="whisper-1", response_format="text").strip() == text
    srt = transcribe(model="whisper-1", response_format="srt")
    vtt = transcribe(model="whisper-1", response_format="vtt")
    assert srt.startswith("1\n") and " --> " in srt and vtt.startswith("WEBVTT") and " --> " in vtt
    said = " ".join(line for line in srt.splitlines() if line and "-->" not in line and not line.isdigit())
    assert said.split() == text.split()
    verbose = transcribe(model="whisper-1", response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert verbose.text == text and abs(verbose.duration - 0.77) < 0.01
    assert [w.word for w in verbose.words] == text.split()
    assert " ".join(s.text for s in verbose.segments).split() == text.split()


def test_streamed_transcription_sends_words_before_the_job_ends(client, server, shared_audio):
    audio = (shared_audio / "en_long_24k.wav").read_bytes()
    deltas, state_at_first = [], None
    with client.audio.transcriptions.with_streaming_response.create(
        file=("long.wav", audio), model="gpt-4o-transcribe", stream=True,
    ) as response:
        job_id = response.headers["x-job-id"]
        for event in response.parse():
            if event.type == "transcript.text.delta":
                if not deltas:  # the job's own record, at the moment the first word arrived
                    state_at_first = httpx.get(f"{server}/v1/jobs/{job_id}").json()
                deltas.append(event.delta)
            else:
                assert event.type == "transcript.text.done"
                done = event.text
    assert len(deltas) > 3 and "".join(deltas) == done
    assert state_at_first["state"] == "running" and state_at_first["progress"] < 0.9, state_at_first
    assert client.audio.transcriptions.create(file=("long.wav", audio), model="whisper-1").text == done


def _speech(client, server, **options) -> tuple[bytes, float]:
    """The streamed answer, and the length in seconds of its job's own audio."""
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice=VOICES[0], **options) as response:
        data, job_id = response.read(), response.headers["x-job-id"]
    wav = httpx.get(f"{server}/v1/jobs/{job_id}/artifacts/audio.wav").content
    return data, (len(wav) - 44) / 2 / 24000


def _seconds(fmt: str, data: bytes) -> tuple[float, int]:
    if fmt == "pcm":
        return len(data) / 2 / 24000, 24000
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate, stream.rate


def test_speech_in_every_format_decodes_to_the_jobs_audio(client, server):
    for fmt in SPEECH_FORMATS:
        data, seconds = _speech(client, server, input="hello there", response_format=fmt)
        length, rate = _seconds(fmt, data)
        assert rate == (48000 if fmt == "opus" else 24000), fmt  # Opus always decodes at 48 kHz
        assert seconds > 0.3 and abs(length - seconds) < 0.1, (fmt, length, seconds)  # mp3/aac: delay, padding


def test_speech_speed_scales_the_duration(client, server):
    # The pitch it keeps is checked on a sine through the same encoder (tests/core/formats/test_audio_stream.py).
    for speed in (0.5, 2.0):
        data, seconds = _speech(client, server, input="hello how are you", response_format="wav", speed=speed)
        length, _ = _seconds("wav", data)
        assert abs(length * speed / seconds - 1) < 0.05, (speed, length, seconds)


def test_translation_and_unknown_models_are_refused_in_openais_shape(client, server, shared_audio):
    audio = ("q.wav", (shared_audio / "en_short_16k.wav").read_bytes())
    with pytest.raises(openai.NotFoundError, match="translation is not offered") as refused, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK's own note on its translations call
        client.audio.translations.create(file=audio, model="whisper-1")
    assert refused.value.body == {"message": refused.value.body["message"], "type": "invalid_request_error",
                                  "param": None, "code": "not_offered"}
    # One status for one cause: OpenAI's 404 model_not_found, on speech and transcription alike.
    for call in (lambda: client.audio.transcriptions.create(file=audio, model="whisper-2"),
                 lambda: client.audio.speech.create(model="tts-2", voice=VOICES[0], input="hi")):
        with pytest.raises(openai.NotFoundError, match="unknown model") as unknown:
            call()
        assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.audio.speech.create(model="tts-1", voice=VOICES[0], input="hi", speed=5.0)
    assert invalid.value.param == "speed" and invalid.value.type == "invalid_request_error"
    # Our own routes keep our own shape.
    ours = httpx.post(f"{server}/v1/tts", json={"text": ""}).json()
    assert set(ours["error"]) == {"code", "message"}

"""TTS through the server: the job API, the voice list, and OpenAI's client on /v1/audio/speech.

The server runs as users run it (`python -m api`, jobs in-process) on the tiny TTS folder.
"""

import io
import os
import time

import httpx
import pytest
import soundfile as sf
from servers import REPO_DIR, running_api, wait_until
from tts_oracle import VOICES, tiny_tts  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e  # real servers

TEXT = "hello how are you doing today i am fine thank you"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tts):  # noqa: F811
    folder, voices = tiny_tts
    root = tmp_path_factory.mktemp("tts-api")
    env = {**os.environ, "MOSHI_TTS_MODEL": str(folder), "MOSHI_TTS_VOICES": str(voices), "MOSHI_DTYPE": "float32",
           "MOSHI_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "MOSHI_STORAGE_DIR": str(root / "storage"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR)}
    with running_api(env, root) as url:
        yield url


def test_openai_client_gets_speech_streamed_while_it_is_generated(server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    arrivals, data = [], b""
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice=VOICES[1], input=TEXT, response_format="wav",
    ) as response:
        job_id = response.headers["x-job-id"]
        for chunk in response.iter_bytes():
            arrivals.append((time.time(), len(data)))
            data += chunk
    job = httpx.get(f"{server}/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["params"]["voice"] == VOICES[1]
    # The first bytes left while the job was still generating, well before it ended.
    first_at, _ = arrivals[0]
    assert first_at < job["timings"]["finished_at"] - 0.5, (arrivals[:3], job["timings"])
    assert len(arrivals) > 3
    # A header of unknown length, then the samples of the job's own wav.
    assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff"
    wav = httpx.get(f"{server}/v1/jobs/{job_id}/artifacts/audio.wav").content
    assert data[44:] == wav[44:] and len(data) > 44 + 2 * 24000

    # The non-streaming call reads the same kind of answer; other formats decode too.
    flac = client.audio.speech.create(model="tts-1", voice=VOICES[0], input="hello", response_format="flac")
    audio, rate = sf.read(io.BytesIO(flac.content))
    assert rate == 24000 and audio.shape[0] > 0
    opus = client.audio.speech.create(model="tts-1", voice=VOICES[0], input="hello", response_format="opus")
    assert opus.content[:4] == b"OggS"

    with pytest.raises(openai.UnprocessableEntityError, match="unknown voice"):
        client.audio.speech.create(model="tts-1", voice="nobody", input="hello")
    with pytest.raises(openai.UnprocessableEntityError):
        client.audio.speech.create(model="tts-1", voice=VOICES[0], input="x" * 4097)


def test_tts_job_voices_and_errors(server):
    client = httpx.Client(base_url=server, timeout=30)
    voices = client.get("/v1/voices").json()
    assert sorted(voices["voices"]) == sorted(VOICES) and voices["default"] == VOICES[0]

    response = client.post("/v1/tts", json={"text": "hello how are you", "voice": VOICES[1], "seed": 5})
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    job_id = response.json()["id"]
    job = wait_until(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("succeeded", "failed") and j,
                     120, "the TTS job", interval=0.2)
    assert job["state"] == "succeeded", job
    assert {a["name"] for a in job["artifacts"]} == {"audio.wav", "transcript.json"}
    audio, rate = sf.read(io.BytesIO(client.get(f"/v1/jobs/{job_id}/result").content))
    transcript = client.get(f"/v1/jobs/{job_id}/artifacts/transcript.json").json()
    assert rate == 24000 and transcript["text"] == "hello how are you"
    assert [w["text"] for w in transcript["words"]] == ["hello", "how", "are", "you"]
    starts = [w["start"] for w in transcript["words"]]
    assert starts == sorted(starts) and transcript["words"][-1]["end"] <= len(audio) / 24000 + 1e-6

    for body, code in (({"text": ""}, "invalid_request"), ({"text": "hi", "voice": "../etc"}, "invalid_parameter"),
                       ({"text": "hi", "cfg_coef": 1.7}, "invalid_parameter")):
        response = client.post("/v1/tts", json=body)
        assert response.status_code == 422 and response.json()["error"]["code"] == code, response.text

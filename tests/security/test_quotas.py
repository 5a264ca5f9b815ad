"""Limits per API key: unfinished jobs and stored bytes (429 with Retry-After), and a speech
request whose job cannot start in time (an error status, not 200 and a WAV header, then a drop).

No worker ever runs a job here (the in-process queue's `submit` is a no-op): jobs stay queued
until cancelled, the way they wait behind a busy heavy lane. Each attack worked before issue 15.
"""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from servers import serving_in_thread
from tts_oracle import VOICES, tiny_tts  # noqa: F401 (fixture)

from api.app import create_api
from workers.local_queue import LocalQueue
from workers.settings import Settings

KEYS = ("keyA", "keyB")
STORED_PER_SECOND = 24_000 * 4  # an audio input is kept as float32 at 24 kHz


@pytest.fixture
def no_workers(monkeypatch):
    monkeypatch.setattr(LocalQueue, "submit", lambda queue, job: None)


def _client(tmp_path, **limits) -> TestClient:
    return TestClient(create_api(Settings(storage_dir=tmp_path, api_keys=frozenset(KEYS), device="cpu", **limits)))


def _audio(seconds: float, rate: int = 24_000, format: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(seconds * rate), np.float32), rate, format=format)
    return buffer.getvalue()


def _encode(client: TestClient, key: str, audio: bytes):
    return client.post("/v1/codec/encode", files={"file": ("a.wav", audio)}, headers={"Authorization": f"Bearer {key}"})


def _delete(client: TestClient, key: str, job_id: str):
    return client.delete(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})


def _refused(answer, limit: str) -> None:
    assert answer.status_code == 429, answer.text
    error = answer.json()["error"]
    assert error["code"] == "quota_exceeded" and limit in error["message"] and "DELETE /v1/jobs/" in error["message"]
    assert int(answer.headers["retry-after"]) >= 1


def test_a_key_over_its_job_count_is_refused_while_another_key_submits(tmp_path, no_workers):
    audio = _audio(0.5)
    with _client(tmp_path, key_max_jobs=2) as client:
        first, second = (_encode(client, "keyA", audio) for _ in range(2))
        assert first.status_code == second.status_code == 202, second.text
        over = _encode(client, "keyA", audio)
        _refused(over, "MOSHI_KEY_MAX_JOBS")
        assert "limit (MOSHI_KEY_MAX_JOBS) is 2" in over.json()["error"]["message"]
        assert _encode(client, "keyB", audio).status_code == 202
        # A cancelled job is finished: it no longer counts.
        assert _delete(client, "keyA", first.json()["id"]).json()["state"] == "cancelled"
        assert _encode(client, "keyA", audio).status_code == 202


def test_concurrent_submissions_cannot_all_pass_one_free_place(tmp_path, no_workers):
    audio = _audio(0.5)
    with _client(tmp_path, key_max_jobs=2) as client:
        barrier = threading.Barrier(6)

        def submit(_):
            barrier.wait(timeout=10)
            return _encode(client, "keyA", audio).status_code

        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(submit, range(6)))
        assert codes == [202, 202, 429, 429, 429, 429]


def test_a_key_over_its_storage_is_refused_until_it_deletes_a_finished_job(tmp_path, no_workers):
    audio = _audio(2.0)  # 96 kB of 16-bit WAV, stored as 192 kB
    with _client(tmp_path, key_max_storage_bytes=int(2.5 * 2 * STORED_PER_SECOND)) as client:
        kept = [_encode(client, "keyA", audio) for _ in range(2)]
        assert [a.status_code for a in kept] == [202, 202], kept[-1].text
        _refused(_encode(client, "keyA", audio), "MOSHI_KEY_MAX_STORAGE_MB")
        assert _encode(client, "keyB", audio).status_code == 202  # another key's storage is its own
        job_id = kept[0].json()["id"]
        assert _delete(client, "keyA", job_id).status_code == 200  # cancelled: finished, its files still held
        _refused(_encode(client, "keyA", audio), "MOSHI_KEY_MAX_STORAGE_MB")
        assert _delete(client, "keyA", job_id).status_code == 204  # deleted with its files
        assert _encode(client, "keyA", audio).status_code == 202


def test_a_small_upload_counts_as_the_float32_input_it_becomes(tmp_path, no_workers):
    # The 42 kB FLAC of silence became 57.5 MB of input per job: what is stored counts, not what was sent.
    flac = _audio(60, rate=8_000, format="FLAC")
    assert len(flac) < 50_000
    with _client(tmp_path, key_max_storage_bytes=5 * 2**20) as client:
        answer = _encode(client, "keyA", flac)
        _refused(answer, "MOSHI_KEY_MAX_STORAGE_MB")
        assert "would add 5.5 MB" in answer.json()["error"]["message"]
        assert not any((tmp_path / "jobs").iterdir())  # refused before anything was written


@pytest.fixture
def speech_url(tmp_path, tiny_tts, no_workers):  # noqa: F811
    folder, voices = tiny_tts
    app = create_api(Settings(storage_dir=tmp_path, tts_model=str(folder), tts_voices=str(voices), device="cpu",
                              dtype="float32", sync_timeout_seconds=1.0))
    with serving_in_thread(app) as address:
        yield f"http://{address}"


@pytest.mark.e2e  # a real server on loopback: the status line is what the client sees first
def test_speech_whose_job_cannot_start_in_time_is_an_error_not_a_dropped_200(speech_url):
    body = {"model": "tts-1", "input": "hello there", "voice": VOICES[0]}
    with httpx.stream("POST", f"{speech_url}/v1/audio/speech", json=body, timeout=10) as answer:
        assert answer.status_code == 504, answer.headers
        error = answer.read()
    assert b'"code":"timeout"' in error and b"withdrawn" in error
    # The job it queued is gone: nothing will run it for a caller who has left.
    assert httpx.get(f"{speech_url}/v1/jobs", timeout=10).json() == []

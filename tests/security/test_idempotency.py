"""Idempotency-Key retries that hold: bound to the request as received, claimed atomically,
recovered after a crash. The in-process queue is enough: the claims live in the job store."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from servers import wait_until

from api.app import create_api
from workers.jobs import CLAIM_GRACE, ORPHAN_AGE, JobStore
from workers.settings import Settings


@pytest.fixture
def client(tmp_path, mimi_checkpoint, tiny_moshi):
    settings = Settings(storage_dir=tmp_path, mimi=str(mimi_checkpoint), models=(str(tiny_moshi),), device="cpu",
                        dtype="float32", dialogue_slots=1)
    with TestClient(create_api(settings)) as client:
        yield client
        # The jobs run on the server's threads: let them end before their folders go.
        wait_until(lambda: all(j["state"] not in ("queued", "running") for j in client.get("/v1/jobs").json()),
                   60, "the jobs to finish")


def _encode(client: TestClient, audio: bytes, key: str, num_codebooks: int = 2):
    return client.post("/v1/codec/encode", files={"file": ("a.wav", audio)}, data={"num_codebooks": str(num_codebooks)},
                       headers={"Idempotency-Key": key})


def test_a_retry_seconds_later_replays_the_same_job(client, shared_audio):
    # The stored input is re-written from the upload (with a timestamp in its PEAK chunk): the
    # key must be bound to what was sent, not to that file.
    audio = (shared_audio / "en_short_16k.wav").read_bytes()
    first = _encode(client, audio, "retry-later")
    time.sleep(1.5)
    retry = _encode(client, audio, "retry-later")
    assert first.status_code == 202 and retry.status_code == 202, retry.text
    assert retry.json()["id"] == first.json()["id"] and retry.headers["idempotent-replayed"] == "true"
    other = _encode(client, audio, "retry-later", num_codebooks=3)
    assert other.status_code == 409 and "different request" in other.json()["error"]["message"]


def test_concurrent_identical_requests_give_one_job(client, shared_audio, monkeypatch):
    audio = (shared_audio / "en_short_16k.wav").read_bytes()
    create = JobStore.create

    def slow_create(store, job, files):  # a slow disk: the first request is still making its job
        time.sleep(0.3)
        create(store, job, files)

    monkeypatch.setattr(JobStore, "create", slow_create)
    barrier = threading.Barrier(4)

    def submit(_):
        barrier.wait(timeout=10)
        return _encode(client, audio, "at-once")

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(submit, range(4)))
    assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 3
    assert len(client.get("/v1/jobs").json()) == 1


def _crashed_claim(store: JobStore, key: str) -> str:
    """What a process killed right after claiming `key` leaves: the claim and a folder without a record."""
    store.claim_key("", key, "fingerprint of the dead request", "deadjob")
    (store.jobs_dir / "deadjob").mkdir()
    (store.jobs_dir / "deadjob" / "input.wav").write_bytes(b"half")
    old = time.time() - CLAIM_GRACE - 1
    os.utime(store._key_path("", key), (old, old))
    return "deadjob"


def test_a_claim_left_by_a_dead_request_is_taken_over(client, shared_audio, tmp_path):
    store = JobStore(tmp_path)
    dead = _crashed_claim(store, "crashed")
    retry = _encode(client, (shared_audio / "en_short_16k.wav").read_bytes(), "crashed")
    assert retry.status_code == 202, retry.text
    assert retry.json()["id"] != dead and "idempotent-replayed" not in retry.headers
    again = _encode(client, (shared_audio / "en_short_16k.wav").read_bytes(), "crashed")
    assert again.json()["id"] == retry.json()["id"]


def test_the_purge_removes_the_folders_of_jobs_never_made(tmp_path):
    store = JobStore(tmp_path)
    dead = _crashed_claim(store, "crashed")
    (store.jobs_dir / "being-made").mkdir()  # a request writing its job right now
    store.purge_expired(ttl_seconds=3600, now=time.time() + ORPHAN_AGE / 2)
    assert {p.name for p in store.jobs_dir.iterdir()} == {dead, "being-made"}
    store.purge_expired(ttl_seconds=3600, now=time.time() + ORPHAN_AGE + 1)
    assert list(store.jobs_dir.iterdir()) == []

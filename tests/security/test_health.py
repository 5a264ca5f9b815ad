"""Health and readiness cannot be turned against the server, and no secret is ever shown.

The attacks run against `python -m api` with Celery on a redis-server of the test's own.
"""

import asyncio
import contextlib
import gc
import io
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from servers import REPO_DIR, Redis, free_port, running_api, start_api, start_worker, wait_until

from api.service import READY_TTL
from workers.queue import redacted_url
from workers.settings import Settings

pytestmark = pytest.mark.e2e  # real servers, Redis and a Celery worker

SECRET = "s3cret-pass"


@pytest.fixture(scope="module")
def env(mimi_checkpoint, tiny_moshi) -> dict[str, str]:
    return {
        **os.environ, "MOSHI_MIMI": str(mimi_checkpoint), "MOSHI_MODEL": str(tiny_moshi), "MOSHI_DTYPE": "float32",
        "MOSHI_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR),
    }


@pytest.fixture(scope="module")
def celery_api(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("health")
    redis = Redis(root / "redis").start()
    env = {**env, "REDIS_URL": redis.url, "MOSHI_STORAGE_DIR": str(root / "storage")}
    api, url = start_api(env, root)
    worker = start_worker(env, root, "worker", pool="threads")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, 60, "a worker to answer")
        yield url
    except BaseException:
        print(api.output(), worker.output(), sep="\n----\n")
        raise
    finally:
        worker.stop()
        api.stop()
        redis.stop()


@contextlib.contextmanager
def _no_gc_pauses():
    """A collection of this test process's own objects must not count as the server's latency."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _burst(url: str, n: int) -> tuple[list[httpx.Response], list[float]]:
    """`n` concurrent /readyz, and the latency of /healthz asked again and again meanwhile."""
    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as client:
        burst = asyncio.gather(*(client.get("/readyz") for _ in range(n)))
        healthz: list[float] = []
        with httpx.Client(base_url=url, timeout=20) as probe:
            task = asyncio.ensure_future(burst)
            while not task.done():
                start = time.monotonic()
                assert (await asyncio.to_thread(probe.get, "/healthz")).status_code == 200
                healthz.append(time.monotonic() - start)
            return await task, healthz


def test_a_readyz_burst_costs_one_probe_and_every_route_still_answers(celery_api):
    time.sleep(READY_TTL)  # the fixture's own /readyz is stale: the burst must start a probe
    with _no_gc_pauses():
        answers, healthz = asyncio.run(_burst(celery_api, 200))
    assert all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    # Cached: the whole burst was answered from one or two probes, not 200.
    assert len({a.json()["checked_at"] for a in answers}) <= 2
    # A probe run on the event loop would hold /healthz for the whole of Celery's ping (it waits
    # its 1 s timeout for replies); half of that leaves room for a slow CPU answering the
    # burst's 200 connections (0.21 s seen on a 2-core first-generation Zen).
    assert max(healthz) < 0.5, healthz
    with httpx.Client(base_url=celery_api, timeout=2) as client:
        for route in ("/healthz", "/readyz", "/v1/jobs", "/metrics", "/v1/models"):
            assert client.get(route).status_code == 200, route


def test_models_show_names_not_server_paths(celery_api, env):
    with httpx.Client(base_url=celery_api, timeout=5) as client:
        text = client.get("/v1/models").text
    assert env["MOSHI_MODEL"] not in text and env["MOSHI_MIMI"] not in text
    assert Path(env["MOSHI_MODEL"]).name in text


def _flac(rate: int, channels: int, seconds: float) -> bytes:
    """Silence: a few kB that cost as much to decode as any audio of that rate, channels and length."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((int(rate * seconds), channels), dtype=np.float32), rate, format="FLAC")
    return buffer.getvalue()


@pytest.mark.parametrize("url", [f"redis://:{SECRET}@127.0.0.1:1/0", f"redis://alice:{SECRET}@127.0.0.1:1/0",
                                 f"rediss://alice:{SECRET}@127.0.0.1:1/0", f"redis://{SECRET}@127.0.0.1:1/0",
                                 f"redis://127.0.0.1:1/0?password={SECRET}"])
def test_the_redis_url_is_shown_without_its_password(url):
    shown = redacted_url(url)
    assert SECRET not in shown and "127.0.0.1:1/0" in shown and shown.startswith(url.partition(":")[0] + "://")


def test_an_unreachable_redis_never_shows_its_password(tmp_path, env):
    port = free_port()  # nothing listens there
    env = {**env, "REDIS_URL": f"redis://alice:{SECRET}@127.0.0.1:{port}/0", "MOSHI_STORAGE_DIR": str(tmp_path)}
    api, url = start_api(env, tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            encode = client.post("/v1/codec/encode", files={"file": ("a.flac", _flac(24000, 1, 0.5))})
            answers = [encode, client.get("/readyz"), client.get("/metrics")]
        assert [a.status_code for a in answers] == [503, 503, 200]
        assert f"127.0.0.1:{port}" in answers[0].text and "moshi_queue_up 0" in answers[2].text
        for answer in answers:
            assert SECRET not in answer.text
    finally:
        api.stop()
    assert SECRET not in api.output()


@pytest.fixture(scope="module")
def embedded_api(tmp_path_factory, env):
    """`python -m api` running jobs itself, with short body timeouts."""
    root = tmp_path_factory.mktemp("embedded")
    env = {**env, "MOSHI_STORAGE_DIR": str(root / "storage"), "MOSHI_BODY_IDLE_SECONDS": "1",
           "MOSHI_BODY_TIMEOUT_SECONDS": "3", "MOSHI_SYNC_MAX_SECONDS": "30"}
    with running_api(env, root) as url:
        yield url


def _healthz_while(url: str, request) -> list[float]:
    """The latencies of /healthz asked again and again while `request()` runs in a thread."""
    thread = threading.Thread(target=request)
    latencies = []
    with httpx.Client(base_url=url, timeout=20) as client, _no_gc_pauses():
        thread.start()
        while thread.is_alive():
            start = time.monotonic()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - start)
    thread.join()
    return latencies


def test_decoding_an_openai_transcription_upload_never_blocks_the_server(embedded_api):
    flac = _flac(48000, 8, 120)  # 46 kB, allowed, and about half a second of decoding
    answers = []

    def transcribe() -> None:
        with httpx.Client(base_url=embedded_api, timeout=60) as client:
            answers.append(client.post("/v1/audio/transcriptions", files={"file": ("long.flac", flac)},
                                       data={"model": Settings().stt_model}))

    latencies = _healthz_while(embedded_api, transcribe)
    assert [a.status_code for a in answers] == [413], [a.text for a in answers]
    assert "120.0 s long" in answers[0].json()["error"]["message"]  # it was decoded, then refused
    assert max(latencies) < 0.2, latencies


def _trickle(url: str, pause: float, seconds: float) -> tuple[bytes, float]:
    """A multipart upload whose body comes `pause` s apart, 10 bytes at a time, for at most `seconds`:
    what the server answered once it closed the connection, and when."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/codec/encode HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
        s.settimeout(pause)
        answer = b""
        while time.monotonic() - start < seconds:
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                s.sendall(b"0123456789")
                continue
            if not chunk:
                return answer, time.monotonic() - start
            answer += chunk
    raise AssertionError(f"the connection was still open after {seconds} s (got {answer!r})")


@pytest.mark.parametrize("pause, within", [(0.4, 3), (2, 1)])  # too slow in all; silent for too long
def test_a_trickled_body_gets_408_and_its_connection_closed(embedded_api, pause, within):
    answer, elapsed = _trickle(embedded_api, pause, seconds=8)
    assert answer.startswith(b"HTTP/1.1 408") and b"too long" in answer, answer
    assert within <= elapsed < within + 1.5
    with httpx.Client(base_url=embedded_api, timeout=2) as client:
        assert client.get("/healthz").status_code == 200


def test_a_failed_job_shows_no_server_folder(tmp_path, shared_audio):
    from workers.jobs import Job, JobKind, JobStore, redact_paths
    from workers.models import ModelCache
    from workers.runner import execute_job

    settings = Settings(storage_dir=tmp_path / "storage", mimi=str(tmp_path / "models" / "my-mimi"), device="cpu")
    store = JobStore(settings.storage_dir)
    store.create(Job(id="encode", kind=JobKind.ENCODE, owner="", params={"num_codebooks": 8}, input_name="a.wav"),
                 {"input.wav": (shared_audio / "en_short_16k.wav").read_bytes()})
    execute_job("encode", store, ModelCache(settings))
    message = store.get("encode").error["message"]
    assert "my-mimi" in message and str(tmp_path) not in message, message
    shown = redact_paths(f"cannot read {store.folder('encode') / 'input.wav'}", settings)
    assert shown == "cannot read <storage>/jobs/encode/input.wav"

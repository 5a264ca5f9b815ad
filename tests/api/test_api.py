"""The REST API with real parts: its own redis-server, `python -m api`, `celery worker` processes.

Models are the tiny checkpoints of conftest.py, loaded by the workers through the same code
path as a user's download.
"""

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from servers import REPO_DIR, Redis, start_api, start_worker, wait_until

from moshi_core.formats.tokens import MimiTokens, load_tokens, tokens_to_bytes

pytestmark = pytest.mark.e2e  # real servers, Redis and Celery workers


@pytest.fixture(scope="module")
def base_env(tmp_path_factory, mimi_checkpoint, tiny_moshi) -> dict[str, str]:
    return {
        **os.environ, "MOSHI_MIMI": str(mimi_checkpoint), "MOSHI_MODEL": str(tiny_moshi), "MOSHI_DTYPE": "float32",
        "MOSHI_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "MOSHI_MAX_UPLOAD_MB": "3", "MOSHI_MAX_AUDIO_SECONDS": "60",
        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR),
        "MOSHI_KEY_MAX_JOBS": "100",  # one caller queues a hundred jobs at once below
    }


@contextlib.contextmanager
def _running_stack(root: Path, base_env: dict[str, str], concurrency: int, pool: str = "prefork", **extra_env):
    """Its own redis-server, the API and one worker; their logs are printed if the body fails."""
    redis = Redis(root / "redis").start()
    env = {**base_env, "REDIS_URL": redis.url, "MOSHI_STORAGE_DIR": str(root / "storage"), **extra_env}
    api, url = start_api(env, root)
    worker = start_worker(env, root, "worker", concurrency=concurrency, pool=pool)
    client = httpx.Client(base_url=url, timeout=30)
    try:
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "a worker to answer")
        yield client, env
    except BaseException:
        print(api.output(), worker.output(), sep="\n----\n")
        raise
    finally:
        client.close()
        worker.stop()
        api.stop()
        redis.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_env):
    """Redis, the API and one worker with two processes, as the compose file runs them."""
    root = tmp_path_factory.mktemp("stack")
    with _running_stack(root, base_env, concurrency=2) as (client, env):
        yield client, env, root


def _submit(client: httpx.Client, path: str, file: Path | tuple[str, bytes], headers=None, **form) -> dict:
    name, data = (file.name, file.read_bytes()) if isinstance(file, Path) else file
    response = client.post(path, files={"file": (name, data)}, data={k: str(v) for k, v in form.items()},
                           headers=headers)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued"
    return job


def _wait(client: httpx.Client, job_id: str, timeout: float = 120, headers=None) -> dict:
    def finished():
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(finished, timeout, f"job {job_id}", interval=0.2)


def _cli(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "moshi_core", *args], check=True, env=env, cwd=REPO_DIR,
                   capture_output=True)


def test_encode_decode_dialogue_submit_poll_download(stack, shared_audio, tmp_path):
    client, env, _ = stack
    speech = shared_audio / "en_question_24k.wav"
    encode = _submit(client, "/v1/codec/encode", speech, num_codebooks=8)
    dialogue = _submit(client, "/v1/dialogue", speech, seed=7, max_seconds=4)

    done = _wait(client, encode["id"])
    assert done["state"] == "succeeded", done
    assert done["progress"] == 1 and done["timings"]["run_seconds"] is not None
    result = client.get(f"/v1/jobs/{encode['id']}/result")
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/octet-stream"
    assert 'filename="en_question_24k.tokens.safetensors"' in result.headers["content-disposition"]
    _cli("encode", str(speech), "-o", str(tmp_path / "cli.safetensors"), "--mimi", env["MOSHI_MIMI"],
         "--num-codebooks", "8", env=env)
    ours, cli = load_tokens(result.content), load_tokens(tmp_path / "cli.safetensors")
    assert ours.codes.equal(cli.codes) and ours.num_samples == cli.num_samples

    decode = _submit(client, "/v1/codec/decode", ("speech.safetensors", result.content))
    done = _wait(client, decode["id"])
    assert done["state"] == "succeeded", done
    audio = client.get(f"/v1/jobs/{decode['id']}/artifacts/audio.wav")
    assert audio.headers["content-type"] == "audio/wav"
    wav, rate = sf.read(io.BytesIO(audio.content))
    assert rate == 24000 and len(wav) == cli.num_samples[0]

    done = _wait(client, dialogue["id"])
    assert done["state"] == "succeeded", done
    assert {a["name"] for a in done["artifacts"]} == {"audio.wav", "stereo.wav", "transcript.json",
                                                      "tokens.safetensors"}
    assert done["params"]["seed"] == 7 and done["params"]["model"] == Path(env["MOSHI_MODEL"]).name
    stereo, _ = sf.read(io.BytesIO(client.get(f"/v1/jobs/{dialogue['id']}/artifacts/stereo.wav").content))
    assert stereo.shape == (4 * 24000, 2)
    transcript = client.get(f"/v1/jobs/{dialogue['id']}/artifacts/transcript.json").json()
    assert set(transcript) >= {"text", "words"}
    # The same dialogue from the command line, same seed and the same 4 s: the same voice, bit for bit.
    clip = tmp_path / "clip.wav"
    sf.write(clip, sf.read(speech, dtype="float32")[0][: 4 * 24000], 24000, subtype="FLOAT")
    _cli("dialogue", str(clip), "-o", str(tmp_path / "moshi.wav"), "--model", env["MOSHI_MODEL"], "--dtype",
         "float32", "--seed", "7", "--device", "cpu", env=env)
    assert client.get(f"/v1/jobs/{dialogue['id']}/result").content == (tmp_path / "moshi.wav").read_bytes()


def test_a_threads_worker_batches_concurrent_dialogues(tmp_path, base_env, shared_audio):
    """One worker process, threads pool: dialogue jobs that run at once share LM steps, and
    each gives what it gives alone (here: what `moshi-core dialogue` gives)."""
    with _running_stack(tmp_path, base_env, concurrency=3, pool="threads", MOSHI_DIALOGUE_SLOTS="3") as (client, env):
        speech = shared_audio / "en_question_24k.wav"
        jobs = [_submit(client, "/v1/dialogue", speech, seed=20 + i, max_seconds=3) for i in range(3)]
        done = [_wait(client, job["id"], timeout=300) for job in jobs]
        assert all(d["state"] == "succeeded" for d in done), done
        peaks = [client.get(f"/v1/jobs/{j['id']}/artifacts/transcript.json").json()["batch_peak"] for j in jobs]
        assert max(peaks) >= 2, peaks
        clip = tmp_path / "clip.wav"
        sf.write(clip, sf.read(speech, dtype="float32")[0][: 3 * 24000], 24000, subtype="FLOAT")
        _cli("dialogue", str(clip), "-o", str(tmp_path / "alone.wav"), "--model", env["MOSHI_MODEL"], "--dtype",
             "float32", "--seed", "21", "--device", "cpu", env=env)
        assert client.get(f"/v1/jobs/{jobs[1]['id']}/result").content == (tmp_path / "alone.wav").read_bytes()


def test_worker_killed_mid_job_is_redelivered_and_succeeds_once(stack, shared_audio):
    client, _, _ = stack
    job = _submit(client, "/v1/dialogue", shared_audio / "en_long_24k.wav", seed=3)
    running = wait_until(
        lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["state"] == "running" and j["progress"] > 0 and j,
        120, "the job to run", interval=0.05)
    pid = int(running["worker"].rpartition(":")[2]) if "worker" in running else None
    assert pid is None, "the worker's pid is not part of the public job"
    pid = json.loads((Path(stack[1]["MOSHI_STORAGE_DIR"]) / "jobs" / job["id"] / "job.json").read_text())["worker"]
    os.kill(int(pid.rpartition(":")[2]), signal.SIGKILL)

    done = _wait(client, job["id"], timeout=180)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2
    assert client.get(f"/v1/jobs/{job['id']}/result").status_code == 200
    metrics = client.get("/metrics").text
    assert "moshi_job_redeliveries" in metrics
    # The pool replaced the killed process and the worker still takes jobs.
    again = _submit(client, "/v1/codec/encode", shared_audio / "en_short_16k.wav", num_codebooks=2)
    assert _wait(client, again["id"])["state"] == "succeeded"


def test_a_hundred_concurrent_jobs_each_finish_with_one_result(stack, shared_audio):
    client, _, _ = stack
    data = (shared_audio / "en_short_16k.wav").read_bytes()

    def submit(i: int) -> str:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            response = c.post("/v1/codec/encode", files={"file": (f"short{i}.wav", data)}, data={"num_codebooks": "4"})
            assert response.status_code == 202, response.text
            return response.json()["id"]

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(submit, range(100)))
    assert len(set(ids)) == 100
    results = set()
    for job_id in ids:
        job = _wait(client, job_id, timeout=300)
        assert job["state"] == "succeeded" and job["attempts"] == 1, job
        assert [a["name"] for a in job["artifacts"]] == ["tokens.safetensors"]
        tokens = load_tokens(client.get(f"/v1/jobs/{job_id}/result").content)
        results.add((tokens.codes.numpy().tobytes(), tuple(tokens.num_samples)))
    assert len(results) == 1  # the same input, the same tokens, every time


def _wav_header_claiming(seconds: float, rate: int = 24000) -> bytes:
    """A WAV header announcing `seconds` of 16-bit mono, followed by a few samples only."""
    data_bytes = int(seconds * rate) * 2
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", data_bytes)
    return header + b"\x00\x00" * 1000


def _token_file(codes) -> bytes:
    return tokens_to_bytes(MimiTokens(codes=codes, num_samples=[codes.shape[-1] * 1920], codec="test"))


def _bad_requests(shared_audio: Path) -> list[tuple[str, str, dict, dict, int, str]]:
    import torch

    wav = (shared_audio / "en_question_24k.wav").read_bytes()
    good_tokens = _token_file(torch.zeros(8, 10, dtype=torch.int64))
    out_of_range = bytearray(good_tokens)
    # Turn the last int16 code into 4095, past the 2048 entries of a codebook.
    out_of_range[-2:] = struct.pack("<h", 4095)
    return [
        ("empty file", "/v1/codec/encode", {"file": ("a.wav", b"")}, {}, 422, "empty"),
        ("text renamed .wav", "/v1/codec/encode", {"file": ("notes.wav", b"hello, this is not audio\n" * 40)}, {},
         422, "could not decode"),
        ("wav cut in its header", "/v1/codec/encode", {"file": ("cut.wav", wav[:30])}, {}, 422,
         "uploaded file 'cut.wav'"),
        ("truncated wav", "/v1/codec/encode", {"file": ("cut.wav", wav[: len(wav) // 3])}, {}, 422, "truncated"),
        ("huge upload", "/v1/codec/encode", {"file": ("big.wav", wav[:44] + b"\x00" * (4 * 2**20))}, {}, 413,
         "upload limit"),
        ("3-hour header", "/v1/dialogue", {"file": ("long.wav", _wav_header_claiming(3 * 3600))}, {}, 413,
         "announces 10800.0 s"),
        ("corrupt token file", "/v1/codec/decode", {"file": ("t.safetensors", b"\x10\x00garbage" * 10)}, {}, 422,
         "safetensors"),
        ("codes out of range", "/v1/codec/decode", {"file": ("t.safetensors", bytes(out_of_range))}, {}, 422,
         "token file 't.safetensors': 1 code(s) outside [0, 2048)"),
        ("audio given as tokens", "/v1/codec/decode", {"file": ("t.safetensors", wav)}, {}, 422, "token"),
        ("no file", "/v1/codec/encode", {}, {"num_codebooks": "8"}, 422, "file"),
        ("codebooks not a number", "/v1/codec/encode", {"file": ("a.wav", wav)}, {"num_codebooks": "eight"}, 422,
         "num_codebooks"),
        ("too many codebooks", "/v1/codec/encode", {"file": ("a.wav", wav)}, {"num_codebooks": "33"}, 422,
         "num_codebooks"),
        ("temperature out of range", "/v1/dialogue", {"file": ("a.wav", wav)}, {"temp_text": "-1"}, 422, "temp_text"),
        ("unknown model", "/v1/dialogue", {"file": ("a.wav", wav)}, {"model": "kyutai/nope"}, 404,
         "unknown model 'kyutai/nope'"),
    ]


def test_bad_inputs_get_a_clear_4xx_and_the_worker_stays_up(stack, shared_audio):
    client, _, _ = stack
    before = client.get("/v1/jobs").json()
    for what, path, files, form, status, words in _bad_requests(shared_audio):
        response = client.post(path, files=files or None, data=form)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert words in error["message"], (what, error)
    assert client.get("/v1/jobs").json() == before  # nothing was queued
    for what, url, status in [("unknown job", "/v1/jobs/nope", 404), ("path in id", "/v1/jobs/..%2F..", 404),
                              ("result of unknown job", "/v1/jobs/abc/result", 404)]:
        response = client.get(url)
        assert response.status_code == status and response.json()["error"]["message"], what
    job = _submit(client, "/v1/codec/encode", shared_audio / "en_short_16k.wav", num_codebooks=1)
    assert _wait(client, job["id"])["state"] == "succeeded"
    assert client.get("/readyz").status_code == 200


def test_service_endpoints(stack):
    client, env, _ = stack
    models = client.get("/v1/models").json()["data"]
    # Local folders by their names: the server's paths are not shown.
    assert [m["id"] for m in models][:2] == [Path(env["MOSHI_MODEL"]).name, Path(env["MOSHI_MIMI"]).name]
    assert {m["kind"] for m in models} == {"moshi", "mimi", "stt", "tts"}
    ready = client.get("/readyz").json()
    assert ready["queue"] == "celery" and ready["workers"]
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'moshi_queue_depth{queue="moshi.lm"}' in metrics.text
    assert 'moshi_jobs{kind="encode",state="succeeded"}' in metrics.text
    schema = client.get("/openapi.json").json()
    assert {"/v1/dialogue", "/v1/codec/encode", "/v1/codec/decode", "/v1/jobs/{job_id}"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_redis_outage_answers_503_and_jobs_queued_before_it_complete(tmp_path, base_env, shared_audio):
    redis = Redis(tmp_path / "redis").start()
    env = {**base_env, "REDIS_URL": redis.url, "MOSHI_STORAGE_DIR": str(tmp_path / "storage")}
    api, url = start_api(env, tmp_path)
    worker = None
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/readyz").json()["error"]["code"] == "no_workers"
            jobs = [_submit(client, "/v1/codec/encode", shared_audio / "en_short_16k.wav", num_codebooks=n)
                    for n in (1, 2, 3)]
            redis.stop()
            response = client.post("/v1/codec/encode", files={"file": ("a.wav", (shared_audio / "en_short_16k.wav")
                                                                       .read_bytes())})
            assert response.status_code == 503
            assert "cannot be reached" in response.json()["error"]["message"]
            assert client.get("/readyz").status_code == 503
            assert client.get(f"/v1/jobs/{jobs[0]['id']}").json()["state"] == "queued"
            assert len(client.get("/v1/jobs").json()) == 3  # the refused job left nothing behind

            redis.start()
            worker = start_worker(env, tmp_path, "late-worker")
            for job, n in zip(jobs, (1, 2, 3)):
                done = _wait(client, job["id"])
                assert done["state"] == "succeeded", done
                assert load_tokens(client.get(f"/v1/jobs/{job['id']}/result").content).num_codebooks == n
    except BaseException:
        print(api.output(), worker.output() if worker else "", sep="\n----\n")
        raise
    finally:
        if worker:
            worker.stop()
        api.stop()
        redis.stop()


def test_embedded_queue_with_api_keys_idempotency_and_cancel(tmp_path, base_env, shared_audio):
    """No REDIS_URL: the API runs jobs on its own threads (what `make run` does)."""
    env = {k: v for k, v in base_env.items() if k != "REDIS_URL"}
    env.update(MOSHI_STORAGE_DIR=str(tmp_path / "storage"), MOSHI_API_KEYS="alice-key,bob-key")
    api, url = start_api(env, tmp_path)
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    speech = shared_audio / "en_short_16k.wav"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.post("/v1/codec/encode", files={"file": ("a.wav", speech.read_bytes())})
            assert response.status_code == 401 and "Authorization: Bearer" in response.json()["error"]["message"]
            assert client.get("/v1/jobs", headers={"Authorization": "Bearer mallory"}).status_code == 401

            key = {**alice, "Idempotency-Key": "request-1"}
            first = _submit(client, "/v1/codec/encode", speech, headers=key, num_codebooks=2)
            retry = client.post("/v1/codec/encode", files={"file": ("a.wav", speech.read_bytes())},
                                data={"num_codebooks": "2"}, headers=key)
            assert retry.status_code == 202 and retry.json()["id"] == first["id"]
            assert retry.headers["idempotent-replayed"] == "true"
            other = client.post("/v1/codec/encode", files={"file": ("a.wav", speech.read_bytes())},
                                data={"num_codebooks": "3"}, headers=key)
            assert other.status_code == 409 and "different request" in other.json()["error"]["message"]

            assert _wait(client, first["id"], headers=alice)["state"] == "succeeded"
            assert client.get(f"/v1/jobs/{first['id']}", headers=bob).status_code == 404
            assert client.get(f"/v1/jobs/{first['id']}/result", headers=bob).status_code == 404
            assert [j["id"] for j in client.get("/v1/jobs", headers=bob).json()] == []
            assert client.get("/readyz").json()["queue"] == "in-process"

            long_job = _submit(client, "/v1/dialogue", shared_audio / "en_long_24k.wav", headers=bob)
            wait_until(lambda: client.get(f"/v1/jobs/{long_job['id']}", headers=bob).json()["state"] == "running",
                       60, "the dialogue to start", interval=0.05)
            assert client.get(f"/v1/jobs/{long_job['id']}/result", headers=bob).status_code == 409
            assert client.delete(f"/v1/jobs/{long_job['id']}", headers=bob).status_code == 200
            assert _wait(client, long_job["id"], headers=bob)["state"] == "cancelled"
            cancelled = client.get(f"/v1/jobs/{long_job['id']}/result", headers=bob)
            assert cancelled.status_code == 409 and "cancelled" in cancelled.json()["error"]["message"]
            assert client.delete(f"/v1/jobs/{long_job['id']}", headers=bob).status_code == 204  # finished: deleted
            assert client.get(f"/v1/jobs/{long_job['id']}", headers=bob).status_code == 404
    except BaseException:
        print(api.output())
        raise
    finally:
        api.stop()


def test_expired_jobs_and_keys_are_purged(tmp_path):
    from workers.jobs import Job, JobKind, JobState, JobStore

    store = JobStore(tmp_path)
    old = Job(id="old", kind=JobKind.ENCODE, owner="", params={}, input_name="a.wav", state=JobState.SUCCEEDED,
              created_at=100.0, finished_at=200.0)
    waiting = Job(id="waiting", kind=JobKind.ENCODE, owner="", params={}, input_name="a.wav", created_at=100.0)
    fresh = Job(id="fresh", kind=JobKind.ENCODE, owner="", params={}, input_name="a.wav", state=JobState.FAILED,
                created_at=time.time(), finished_at=time.time())
    for job in (old, waiting, fresh):
        store.create(job, {"input.wav": b"x"})
    assert store.purge_expired(ttl_seconds=3600) == 1
    assert sorted(j.id for j in store.all()) == ["fresh", "waiting"]  # a queued job never expires


def test_a_job_that_keeps_killing_workers_is_given_up(tmp_path):
    """Each delivery counts; past MOSHI_MAX_ATTEMPTS the job fails instead of looping."""
    from workers.jobs import Job, JobKind, JobState, JobStore
    from workers.models import ModelCache
    from workers.runner import execute_job
    from workers.settings import Settings

    store = JobStore(tmp_path)
    # Two workers died running it: the record says running, started twice.
    job = Job(id="doomed", kind=JobKind.ENCODE, owner="", params={"num_codebooks": 8}, input_name="a.wav",
              state=JobState.RUNNING, attempts=2)
    store.create(job, {"input.wav": b"never read"})
    execute_job("doomed", store, ModelCache(Settings(storage_dir=tmp_path, max_attempts=2)))
    done = store.get("doomed")
    assert done.state is JobState.FAILED and done.attempts == 3
    assert done.error["code"] == "worker_lost" and "stopped its worker 2 times" in done.error["message"]
    # Delivered again (a late copy of the message): a finished job is left alone.
    execute_job("doomed", store, ModelCache(Settings(storage_dir=tmp_path, max_attempts=2)))
    assert store.get("doomed").attempts == 3

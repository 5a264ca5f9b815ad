"""Loading models: each load's stages reach the log, whoever waits for it, a job's record; preloading."""

import logging
import threading
import time

import torch

import workers.models
from moshi_core.errors import ModelSourceError
from moshi_core.formats.audio import wav_bytes
from moshi_core.loading.progress import LoadStatus, report_download
from workers.jobs import AUDIO_INPUT, Job, JobKind, JobState, JobStore, new_job_id
from workers.models import LoadLog, ModelCache
from workers.runner import execute_job
from workers.settings import Settings


class SlowLoad:
    """A stand-in loader: reports a download halfway, then waits to be let go, then fails."""

    def __init__(self) -> None:
        self.halfway, self.go_on = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        report_download("model.safetensors", 500, 1000)
        self.halfway.set()
        assert self.go_on.wait(30)
        raise ModelSourceError("no such model")


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def test_a_job_that_waits_for_a_model_shows_its_load_until_it_ends(tmp_path, monkeypatch):
    loader = SlowLoad()
    monkeypatch.setattr(workers.models, "load_mimi", loader)
    models = ModelCache(Settings(storage_dir=tmp_path, cpu_kernels=False, device="cpu"))
    store = JobStore(tmp_path)
    job = Job(id=new_job_id(), kind=JobKind.ENCODE, owner="", params={"num_codebooks": 8}, input_name="a.wav")
    store.create(job, {AUDIO_INPUT: wav_bytes(torch.zeros(1, 2400), exact=True)})
    runner = threading.Thread(target=execute_job, args=(job.id, store, models))
    runner.start()
    try:
        assert loader.halfway.wait(30)
        loading = wait_for(lambda: store.get(job.id).loading)
        assert {k: loading[k] for k in ("model", "stage", "file", "done", "total")} == {
            "model": "mimi", "stage": "downloading", "file": "model.safetensors", "done": 500, "total": 1000}
    finally:
        loader.go_on.set()
        runner.join(30)
    done = store.get(job.id)
    assert done.state is JobState.FAILED and done.error["message"] == "no such model" and done.loading is None


def test_a_load_shows_in_the_log_and_to_its_watcher_with_the_kernel_build_as_a_stage(tmp_path, monkeypatch, caplog):
    built = []

    class Kernels:
        """The kernel build, not yet done in this process."""

        def __call__(self):
            built.append(True)

        def cache_info(self):
            return type("Info", (), {"currsize": len(built)})()

    monkeypatch.setattr(workers.models, "kernels", Kernels())
    monkeypatch.setattr(workers.models, "supported", lambda: True)
    monkeypatch.setattr(workers.models, "load_mimi", lambda *args, **kwargs: "a mimi")
    models = ModelCache(Settings(storage_dir=tmp_path, device="cpu"))
    seen = []
    with caplog.at_level(logging.INFO, logger="moshi.loading"), models.watching(seen.append):
        assert models.mimi() == "a mimi" and models.mimi() == "a mimi"
    assert built == [True]
    assert [s.stage for s in seen] == ["loading weights", "building CPU kernels", "loading weights", "ready"]
    assert caplog.messages[:3] == ["mimi: loading weights", "mimi: building CPU kernels", "mimi: loading weights"]
    assert caplog.messages[3].startswith("mimi: ready (")


def test_preload_loads_what_it_names_and_a_failure_is_left_for_the_next_caller(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(workers.models, "load_mimi", lambda *args, **kwargs: loaded.append("mimi") or "a mimi")
    monkeypatch.setattr(workers.models, "load_stt", SlowLoad())
    workers.models.load_stt.go_on.set()
    models = ModelCache(Settings(storage_dir=tmp_path, cpu_kernels=False, device="cpu", preload=("mimi", "stt")))
    models.start_preload().join(30)
    assert loaded == ["mimi"]
    failed = models.progress.unfinished()
    assert list(failed) == ["stt"] and failed["stt"].error == "no such model"
    assert models.mimi() == "a mimi" and loaded == ["mimi"]


def test_the_log_shows_a_download_every_few_seconds_and_its_end_not_every_chunk(caplog):
    now = [0.0]
    log = LoadLog(logging.getLogger("moshi.loading"), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="moshi.loading"):
        for second in range(13):
            now[0] = second
            log(LoadStatus("moshi", "downloading", 0.0, file="f", done=second, total=12))
    assert [line.split(" f ")[1].split(" of")[0] for line in caplog.messages] == ["0 B", "5 B", "10 B", "12 B"]


def test_the_settings_choose_how_q8_weights_multiply(tmp_path, monkeypatch):
    from moshi_core.kernels import build, q8

    monkeypatch.setattr(q8, "INT8_ACTIVATIONS", True)
    monkeypatch.setattr(build, "ENABLED", True)
    ModelCache(Settings.from_env({"MOSHI_Q8_ACTIVATIONS": "float", "MOSHI_STORAGE_DIR": str(tmp_path)}))
    assert q8.INT8_ACTIVATIONS is False
    ModelCache(Settings(storage_dir=tmp_path))
    assert q8.INT8_ACTIVATIONS is True

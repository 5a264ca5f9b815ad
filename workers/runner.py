"""Running one job: the code every queue (Celery or in-process) calls with a job id.

It is idempotent: a finished job is left alone, so a message delivered twice (a worker died
after finishing but before acknowledging) does nothing the second time, and a job that was
running when its worker died is run again from its validated input. Each start counts an
attempt; a job that has killed `max_attempts` workers is given up instead of looping.
"""

import logging
import os
import socket
import time
import traceback

from moshi_core.errors import MoshiError
from moshi_core.loading.progress import FAILED, READY, LoadStatus

from .errors import JobCancelledError, JobNotFoundError
from .jobs import Job, JobState, JobStore, redact_paths
from .models import ModelCache
from .pipelines import PIPELINES
from .settings import Settings

log = logging.getLogger("moshi.workers")

PROGRESS_INTERVAL = 0.5  # seconds between progress writes (and cancellation checks)


class _Progress:
    """Records a job's progress now and then, and stops it when a cancellation was asked for."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL and done < total:
            return
        self.last = now
        with self.store.update(self.job_id) as job:
            if job.cancel_requested:
                raise JobCancelledError("cancelled while running")
            job.progress = round(min(done / max(total, 1), 1.0) * 0.99, 4)  # 1.0 only once the files are written


class _Loading:
    """Shows the load of a model the job waits for in its record (`loading`): each stage, and a
    download's bytes now and then."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.last, self.shown = 0.0, ("", None)

    def __call__(self, status: LoadStatus) -> None:
        now = time.monotonic()
        over = status.stage in (READY, FAILED)
        if (status.stage, status.file) == self.shown and now - self.last < PROGRESS_INTERVAL:
            return
        self.last, self.shown = now, (status.stage, status.file)
        with self.store.update(self.job_id) as job:
            job.loading = None if over else status.to_dict()


def _error_code(exc: BaseException) -> str:
    name = type(exc).__name__.removesuffix("Error")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_") or "error"


def _start(store: JobStore, job_id: str, settings: Settings) -> Job | None:
    """Mark the job running and count the attempt; None when there is nothing to run."""
    with store.update(job_id) as job:
        if job.state.finished:
            log.info("job %s is already %s: nothing to do", job_id, job.state.value)
            return None
        if job.cancel_requested:
            job.state, job.finished_at = JobState.CANCELLED, time.time()
            return None
        job.attempts += 1
        if job.attempts > settings.max_attempts:
            job.state, job.finished_at = JobState.FAILED, time.time()
            job.error = {
                "code": "worker_lost",
                "message": f"the job stopped its worker {settings.max_attempts} times (out of memory?) and was "
                "given up; try a shorter input, or ask the operator to check the workers' logs",
            }
            return None
        job.state, job.progress, job.error = JobState.RUNNING, 0.0, None
        job.started_at = job.started_at or time.time()
        job.worker = f"{socket.gethostname()}:{os.getpid()}"
        return job


def execute_job(job_id: str, store: JobStore, models: ModelCache) -> None:
    try:
        job = _start(store, job_id, models.settings)
    except JobNotFoundError:
        log.warning("job %s is gone (expired or deleted): skipped", job_id)
        return
    if job is None:
        return
    log.info("job %s (%s) started, attempt %d", job.id, job.kind.value, job.attempts)
    error: dict[str, str] | None = None
    state, artifacts = JobState.SUCCEEDED, []
    try:
        with models.watching(_Loading(store, job.id)):
            artifacts = PIPELINES[job.kind](job, store.folder(job.id), models, _Progress(store, job.id))
    except JobCancelledError:
        state = JobState.CANCELLED
    except MoshiError as exc:
        state, error = JobState.FAILED, {"code": _error_code(exc), "message": str(exc)}
    except Exception as exc:  # a bug or the machine (e.g. out of memory): the job fails, the worker lives
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        state, error = JobState.FAILED, {"code": "internal", "message": f"internal error ({type(exc).__name__}: {exc})"}
    if error is not None:  # the owner reads it: the server's folders are no business of theirs (the log has them)
        error["message"] = redact_paths(error["message"], models.settings)
    with store.update(job.id) as done:
        done.state, done.error, done.artifacts, done.finished_at = state, error, artifacts, time.time()
        done.loading = None
        if state is JobState.SUCCEEDED:
            done.progress = 1.0
    log.info("job %s %s", job.id, state.value)

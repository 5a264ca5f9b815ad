"""The job service behind the routes: validate, store, queue, report.

Inputs are checked completely here, in the API process, before anything is queued: audio
is decoded (its content decides, not its name), token files are read and range-checked,
parameters are bounded. A worker is then only ever given input it can process.
"""

import asyncio
import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass

from moshi_core.errors import InvalidTokenFileError
from moshi_core.formats.audio import load_audio, wav_bytes
from moshi_core.formats.pcm import SAMPLE_RATE
from moshi_core.formats.tokens import load_tokens
from moshi_core.params import SamplingOverrides
from workers.errors import (
    JobNotReadyError,
    JobTimeoutError,
    QueueUnavailableError,
    QuotaExceededError,
    UnknownModelError,
)
from workers.jobs import (
    AUDIO_INPUT,
    PRIMARY_ARTIFACT,
    TOKENS_INPUT,
    Job,
    JobKind,
    JobState,
    JobStore,
    new_job_id,
    public_name,
    redact_paths,
)
from workers.queue import JobQueue
from workers.settings import Settings

READY_TTL = 3.0  # seconds a readiness answer is reused: any number of /readyz costs one probe per this
READY_TIMEOUT = 5.0  # a probe that takes longer is reported as not ready (its thread is not started again)
QUOTA_RETRY_AFTER = 10  # seconds a caller over its job limit is told to wait: long enough for a short job to end


@dataclass
class Submission:
    job: Job
    replayed: bool  # an Idempotency-Key retry: the job an earlier identical request made


@dataclass(frozen=True)
class Readiness:
    workers: list[str]
    error: str | None  # why jobs cannot be queued now; None when the queue answers
    checked_at: float


class ReadinessProbe:
    """The queue's readiness, probed in a worker thread at most once per `READY_TTL`.

    Concurrent callers await the same probe, and a probe stuck past its timeout is awaited
    again rather than joined by a second one: a burst of /readyz holds at most one thread.
    """

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._last: Readiness | None = None
        self._running: asyncio.Future[Readiness] | None = None

    def _probe(self) -> Readiness:
        try:
            self.queue.check()
            return Readiness(self.queue.workers(), None, time.time())
        except QueueUnavailableError as exc:
            return Readiness([], str(exc), time.time())

    def _finished(self, probe: asyncio.Future[Readiness]) -> None:
        self._running = None
        if not probe.cancelled() and probe.exception() is None:
            self._last = probe.result()

    async def get(self) -> Readiness:
        if self._last is not None and time.time() - self._last.checked_at < READY_TTL:
            return self._last
        if self._running is None:
            self._running = asyncio.ensure_future(asyncio.to_thread(self._probe))
            self._running.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(self._running), READY_TIMEOUT)
        except TimeoutError:
            self._last = Readiness([], f"the job queue ({self.queue.name}) did not answer within "
                                   f"{READY_TIMEOUT:g} s: try again in a moment", time.time())
            return self._last


class JobService:
    def __init__(self, settings: Settings, store: JobStore, queue: JobQueue) -> None:
        self.settings, self.store, self.queue = settings, store, queue
        self.readiness = ReadinessProbe(queue)

    def loading(self) -> dict[str, dict]:
        """The loads of this process's models under way or failed, by model (`/readyz`); a Celery
        worker's own loads show in the jobs that wait for them."""
        models = getattr(self.queue, "models", None)  # only the in-process queue holds models
        if models is None:
            return {}
        loading = {name: status.to_dict() for name, status in models.progress.unfinished().items()}
        for status in loading.values():  # anyone may ask /readyz: no server folder in an error
            if "error" in status:
                status["error"] = redact_paths(status["error"], self.settings)
        return loading

    # Inputs.

    def audio_input(
        self, data: bytes, name: str, max_seconds: float | None = None
    ) -> tuple[dict[str, bytes], float]:
        """Decode an upload (refused beyond the server's limit) and keep at most its first
        `max_seconds`: the job's input file, and its duration in seconds."""
        wav = load_audio(data, max_seconds=self.settings.max_audio_seconds, label=f"the uploaded file {name!r}")
        if max_seconds is not None:
            wav = wav[:, : int(max_seconds * SAMPLE_RATE)]
        return {AUDIO_INPUT: wav_bytes(wav, exact=True)}, wav.shape[-1] / SAMPLE_RATE

    def tokens_input(self, data: bytes, name: str) -> dict[str, bytes]:
        tokens = load_tokens(data, label=f"the uploaded token file {name!r}")
        if tokens.batch_size != 1:
            raise InvalidTokenFileError(
                f"the token file holds {tokens.batch_size} items; a job decodes one: "
                "encode files one at a time, or decode a batch with `moshi-core decode`"
            )
        seconds = tokens.num_samples[0] / SAMPLE_RATE
        if seconds > self.settings.max_audio_seconds:
            raise InvalidTokenFileError(
                f"the token file decodes to {seconds:.1f} s of audio; this server's limit is "
                f"{self.settings.max_audio_seconds:g} s"
            )
        return {TOKENS_INPUT: data}

    def dialogue_params(self, model: str | None, seed: int | None, sampling: SamplingOverrides,
                        max_seconds: float | None) -> tuple[dict, dict]:
        """A dialogue job's record (the overrides' fields flat beside model, seed and max_seconds),
        and what was asked: its idempotency fingerprint, from before the server chose a seed or a model."""
        source = self.moshi_source(model)
        # A model named by its public name or its source is the same request.
        asked = {"model": source if model else None, "seed": seed, **sampling.to_dict(), "max_seconds": max_seconds}
        # The seed is chosen now and kept, so the job is reproducible and a redelivered job gives the same answer.
        record = dict(asked, model=source, seed=secrets.randbelow(2**31) if seed is None else seed)
        return record, asked

    def moshi_source(self, model: str | None) -> str:
        """The Moshi model a job names, by its public name (GET /v1/models) or its source."""
        if not model:
            return self.settings.default_model
        for source in self.settings.models:
            if model in (source, public_name(source)):
                return source
        served = ", ".join(public_name(source) for source in self.settings.models)
        raise UnknownModelError(f"unknown model {model!r}: this server serves {served} "
                                "(an operator adds more with MOSHI_MODELS)")

    # Jobs.

    def submit(
        self, kind: JobKind, owner: str, params: dict, files: dict[str, bytes], input_name: str,
        idempotency_key: str | None = None, fingerprint_params: dict | None = None, upload: bytes | None = None,
    ) -> Submission:
        """Store and queue a job. With an `idempotency_key`, the key is bound to the request as it
        was received (`upload`, the file's bytes, when the stored input is re-written from it; else
        `files`), so a retry gets the same job; identical requests at once get one job."""
        job = Job(id=new_job_id(), kind=kind, owner=owner, params=params, input_name=input_name)
        if idempotency_key:
            received = {"upload": upload} if upload is not None else files
            fingerprint = _fingerprint(kind, fingerprint_params or params, received)
            earlier = self.store.claim_key(owner, idempotency_key, fingerprint, job.id)
            if earlier is not None:
                return Submission(self.store.get_for(earlier, owner), replayed=True)
        try:
            self.queue.check()
            with self.store.owner_locked(owner):
                self._check_quota(owner, files)
                self.store.create(job, files)
            try:
                self.queue.submit(job)
            except BaseException:
                self.store.delete(job.id)  # never leave a job that no worker will ever see
                raise
        except BaseException:
            if idempotency_key:
                self.store.release_key(owner, idempotency_key, job.id)
            raise
        return Submission(job, replayed=False)

    def _check_quota(self, owner: str, files: dict[str, bytes]) -> None:
        """QuotaExceededError when `owner` has too many unfinished jobs, or when `files` (what
        this job will store: an audio input as float32 24 kHz WAV, 96 kB per second whatever
        was uploaded) would take its stored bytes past the limit."""
        s, usage = self.settings, self.store.usage(owner)
        who = "this API key has" if owner else "this server's callers (no API keys are set: all share one quota) have"
        if usage.unfinished >= s.key_max_jobs:
            raise QuotaExceededError(
                f"{who} {usage.unfinished} unfinished jobs, the limit (MOSHI_KEY_MAX_JOBS) is {s.key_max_jobs}: "
                "wait for some to finish, or cancel one with DELETE /v1/jobs/{id}", QUOTA_RETRY_AFTER)
        incoming = sum(len(data) for data in files.values())
        if usage.bytes + incoming > s.key_max_storage_bytes:
            if usage.oldest_finished is None:  # only running jobs hold it: they will finish, then be deletable
                retry_after = QUOTA_RETRY_AFTER
            else:
                retry_after = max(1, math.ceil(usage.oldest_finished + s.job_ttl_seconds - time.time()))
            raise QuotaExceededError(
                f"{who} {usage.bytes / 2**20:.1f} MB in job files and this job would add "
                f"{incoming / 2**20:.1f} MB (uploaded audio is stored at 96 kB per second); the limit "
                f"(MOSHI_KEY_MAX_STORAGE_MB) is {s.key_max_storage_bytes / 2**20:g} MB: delete finished jobs you "
                f"no longer need with DELETE /v1/jobs/{{id}}, or wait for them to expire "
                f"({s.job_ttl_seconds / 3600:g} h after they finish)", retry_after)

    def withdraw(self, job_id: str) -> bool:
        """Cancel and delete a job no worker has started (True); False once one has."""
        with self.store.update(job_id) as job:
            if job.state is not JobState.QUEUED:
                return False
            job.state, job.finished_at, job.cancel_requested = JobState.CANCELLED, time.time(), True
        self.store.delete(job_id)  # a worker handed it later finds no job and skips it
        return True

    def cancel(self, job_id: str, owner: str) -> Job | None:
        """Cancel a queued or running job; delete a finished one (None)."""
        job = self.store.get_for(job_id, owner)
        if job.state.finished:
            self.store.delete(job_id)
            return None
        with self.store.update(job_id) as job:
            job.cancel_requested = True
            if job.state is JobState.QUEUED:  # a worker that picks it up later will skip it
                job.state, job.finished_at = JobState.CANCELLED, time.time()
        return job

    def artifact_path(self, job_id: str, owner: str, name: str | None):
        """The file of a finished job's artifact (its main one when `name` is None)."""
        job = self.store.get_for(job_id, owner)
        if job.state is not JobState.SUCCEEDED:
            what = {
                JobState.QUEUED: "is queued",
                JobState.RUNNING: f"is running ({job.progress:.0%} done)",
                JobState.FAILED: f"failed: {job.error['message'] if job.error else 'unknown error'}",
                JobState.CANCELLED: "was cancelled",
            }[job.state]
            hint = f"; poll GET /v1/jobs/{job.id} until its state is succeeded" if not job.state.finished else ""
            raise JobNotReadyError(f"job {job.id} {what}: it has no result{hint}")
        name = name or PRIMARY_ARTIFACT[job.kind]
        if name not in job.artifacts:
            raise JobNotReadyError(f"job {job.id} has no artifact {name!r}; it has {', '.join(job.artifacts)}")
        return job, self.store.folder(job.id) / name

    async def wait(self, job_id: str, timeout: float) -> Job:
        """The job once finished; JobTimeoutError (the job goes on) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not (job := self.store.get(job_id)).state.finished:
            if time.monotonic() > deadline:
                raise JobTimeoutError(
                    f"the job is still {job.state.value} after {timeout:g} s; it goes on as job {job.id}: "
                    f"poll GET /v1/jobs/{job.id}"
                )
            await asyncio.sleep(0.05)
        return job

    def sizes(self, job: Job) -> dict[str, int]:
        folder = self.store.folder(job.id)
        return {name: (folder / name).stat().st_size for name in job.artifacts if (folder / name).exists()}


def _fingerprint(kind: JobKind, params: dict, files: dict[str, bytes]) -> str:
    digest = hashlib.sha256(json.dumps([kind.value, params], sort_keys=True).encode())
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()

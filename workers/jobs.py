"""Job records and their files, in a storage directory shared by the API and the workers.

A job is a folder `<storage>/jobs/<id>/` holding `job.json` (the record), the validated
input and, once done, its artifacts; `<storage>/owners/<owner>/<id>` (empty) lists each
owner's jobs, so an owner's quota is counted over its own jobs, not every job. Audio never
travels through the broker: a queued message is only a job id. Every write is atomic (write
a temporary file, then rename), and read-modify-write cycles hold a per-job file lock, so the
API cancelling a job and a worker reporting progress never lose each other's changes.
"""

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moshi_core.formats.audio import atomic_write_bytes

from .errors import IdempotencyConflictError, JobNotFoundError
from .settings import Settings

CLAIM_GRACE = 15.0  # seconds a request may take from claiming an Idempotency-Key to making its job
ORPHAN_AGE = 600.0  # a job folder without a record this old is what a process killed mid-create left


class JobKind(str, enum.Enum):
    DIALOGUE = "dialogue"
    ENCODE = "encode"
    DECODE = "decode"
    TRANSCRIBE = "transcribe"
    TTS = "tts"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# Celery queues, by cost: a worker can serve one or both.
HEAVY_QUEUE = "moshi.lm"  # Moshi, STT and TTS: seconds to minutes of a big model
LIGHT_QUEUE = "moshi.codec"  # Mimi encode/decode: short
QUEUE_OF = {
    JobKind.DIALOGUE: HEAVY_QUEUE, JobKind.TRANSCRIBE: HEAVY_QUEUE, JobKind.TTS: HEAVY_QUEUE,
    JobKind.ENCODE: LIGHT_QUEUE, JobKind.DECODE: LIGHT_QUEUE,
}

# The files of a job's folder that the API writes and the pipelines read.
AUDIO_INPUT = "input.wav"  # the upload, decoded to 24 kHz mono float32 by the API
TOKENS_INPUT = "input.safetensors"  # a token file the API has read and checked
TEXT_INPUT = "input.txt"  # the text of a TTS job (UTF-8), never sent through the broker
TTS_STREAM = "audio.pcm"  # a TTS job's audio as it is made (s16le, 24 kHz mono), read by /v1/audio/speech
WORDS_STREAM = "words.jsonl"  # a transcription's words as they are recognised, one JSON a line, for streaming

# The file each kind answers `GET /v1/jobs/{id}/result` with, and the content type of each artifact.
PRIMARY_ARTIFACT = {
    JobKind.DIALOGUE: "audio.wav", JobKind.ENCODE: "tokens.safetensors", JobKind.DECODE: "audio.wav",
    JobKind.TRANSCRIBE: "transcript.json", JobKind.TTS: "audio.wav",
}
CONTENT_TYPES = {
    ".wav": "audio/wav", ".json": "application/json", ".safetensors": "application/octet-stream",
    ".srt": "application/x-subrip", ".vtt": "text/vtt", ".txt": "text/plain; charset=utf-8",
}


@dataclass
class Job:
    id: str
    kind: JobKind
    owner: str  # a digest of the API key that made it ("" without keys); never the key itself
    params: dict[str, Any]
    input_name: str  # the uploaded file's name, for the artifacts' download names
    state: JobState = JobState.QUEUED
    progress: float = 0.0
    # While a running job waits for a model to load: its LoadStatus (stage, bytes downloaded...).
    loading: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, str] | None = None  # {"code": ..., "message": ...}
    artifacts: list[str] = field(default_factory=list)
    attempts: int = 0  # deliveries to a worker, counted when one starts it
    worker: str | None = None  # host:pid of the worker running or that ran it
    cancel_requested: bool = False

    def to_json(self) -> str:
        data = asdict(self)
        data["kind"], data["state"] = self.kind.value, self.state.value
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        job = cls(**{k: v for k, v in data.items() if k in known})
        job.kind, job.state = JobKind(job.kind), JobState(job.state)
        return job


@dataclass
class Usage:
    """One owner's share of the storage: its unfinished jobs and the bytes of all its job folders."""

    unfinished: int = 0
    bytes: int = 0
    oldest_finished: float | None = None  # when its earliest finished job finished (it expires first)


@contextmanager
def _file_locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path` (made if missing), across processes; the OS releases
    it if its holder dies. FileNotFoundError when `path`'s folder does not exist."""
    lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def new_job_id() -> str:
    """128 random bits, URL-safe: ids cannot be guessed or enumerated."""
    return secrets.token_urlsafe(16)


def public_name(source: str) -> str:
    """A model source as clients see it: a local folder by its name only, never its server path."""
    if "://" not in source and (source.startswith(("/", "~", ".")) or Path(source).exists()):
        return Path(source).expanduser().name or source
    return source


def redact_paths(message: str, settings: Settings) -> str:
    """`message` (a job's error, for its owner) without the server's storage and model folders."""
    for source in sorted({*settings.models, settings.mimi, settings.stt_model, settings.tts_model,
                          settings.tts_voices}, key=len, reverse=True):
        if public_name(source) != source:
            message = message.replace(str(Path(source).expanduser()), public_name(source))
    for root in {str(settings.storage_dir), str(Path(settings.storage_dir).resolve())}:
        message = message.replace(root, "<storage>")
    return message


def owner_of(api_key: str | None) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else ""


class JobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.keys_dir = self.root / "idempotency"
        self.owners_dir = self.root / "owners"
        for folder in (self.jobs_dir, self.keys_dir, self.owners_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def folder(self, job_id: str) -> Path:
        # Ids come from URLs: only our own alphabet may reach the filesystem.
        if not job_id or not all(c.isalnum() or c in "-_" for c in job_id) or len(job_id) > 64:
            raise JobNotFoundError(f"no job {job_id!r}")
        return self.jobs_dir / job_id

    def create(self, job: Job, files: dict[str, bytes]) -> None:
        """Write the job's input files and then its record: a job is visible only when whole."""
        folder = self.folder(job.id)
        folder.mkdir(parents=True)
        for name, data in files.items():
            atomic_write_bytes(folder / name, data)
        atomic_write_bytes(folder / "job.json", job.to_json().encode())
        owned = self._owner_folder(job.owner)
        owned.mkdir(exist_ok=True)
        (owned / job.id).touch()

    def get(self, job_id: str) -> Job:
        try:
            return Job.from_json((self.folder(job_id) / "job.json").read_text())
        except FileNotFoundError:
            raise JobNotFoundError(
                f"no job {job_id!r}: it never existed, or it finished more than the retention time ago"
            ) from None

    def get_for(self, job_id: str, owner: str) -> Job:
        """The job if `owner` made it; someone else's job is reported as absent, not forbidden."""
        job = self.get(job_id)
        if job.owner != owner:
            raise JobNotFoundError(f"no job {job_id!r}")
        return job

    @contextmanager
    def update(self, job_id: str) -> Iterator[Job]:
        """Read, let the caller change, and write back a job under its lock."""
        folder = self.folder(job_id)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(_file_locked(folder / ".lock"))
            except FileNotFoundError:
                raise JobNotFoundError(f"no job {job_id!r}") from None
            job = self.get(job_id)
            yield job
            atomic_write_bytes(folder / "job.json", job.to_json().encode())

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def all(self) -> Iterator[Job]:
        for folder in self.jobs_dir.iterdir():
            try:
                yield self.get(folder.name)
            except (JobNotFoundError, ValueError, TypeError, json.JSONDecodeError):
                continue  # being created or deleted right now, or not ours

    def purge_expired(self, ttl_seconds: float, now: float | None = None) -> int:
        """Delete finished jobs (and idempotency keys) older than `ttl_seconds`, and the folders of jobs
        never made; returns how many jobs."""
        now = time.time() if now is None else now
        purged = 0
        for job in list(self.all()):
            if job.state.finished and (job.finished_at or job.created_at) + ttl_seconds < now:
                self.delete(job.id)
                purged += 1
        for folder in self.jobs_dir.iterdir():
            try:
                if not (folder / "job.json").exists() and folder.stat().st_mtime + ORPHAN_AGE < now:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                continue
        for key in self.keys_dir.iterdir():
            try:
                if not key.name.startswith(".") and key.stat().st_mtime + ttl_seconds < now:
                    key.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        return purged

    # Per-owner usage, for the quotas. An entry whose job is gone (deleted, purged) is dropped
    # when next counted, so deleting a job needs no bookkeeping.

    def _owner_folder(self, owner: str) -> Path:
        return self.owners_dir / (owner or "-")  # owners are hex digests, or "" without keys

    @contextmanager
    def owner_locked(self, owner: str) -> Iterator[None]:
        """Hold `owner`'s lock, across processes: counting and creating under it, two submissions
        at once cannot both pass a quota that has room for one."""
        owned = self._owner_folder(owner)
        owned.mkdir(exist_ok=True)
        with _file_locked(owned / ".lock"):
            yield

    def usage(self, owner: str) -> Usage:
        """What `owner`'s jobs hold now: one record read and one folder listing per job of theirs."""
        usage = Usage()
        owned = self._owner_folder(owner)
        if not owned.is_dir():
            return usage
        for entry in owned.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                job = self.get(entry.name)
                usage.bytes += sum(f.stat().st_size for f in os.scandir(self.folder(job.id)) if f.is_file())
            except (JobNotFoundError, FileNotFoundError):
                entry.unlink(missing_ok=True)
                continue
            if job.state.finished:
                done = job.finished_at or job.created_at
                usage.oldest_finished = min(done, usage.oldest_finished or done)
            else:
                usage.unfinished += 1
        return usage

    # Idempotency-Key: (owner, key) -> the job a first request made, and a fingerprint of
    # that request, so that a retry gets the same job and a different request is refused.

    def _key_path(self, owner: str, key: str) -> Path:
        return self.keys_dir / hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()

    def _keys_locked(self) -> contextlib.AbstractContextManager[None]:
        # One lock for every key, across the API processes sharing this storage: a claim is a few file operations.
        return _file_locked(self.keys_dir / ".lock")

    def _take_key(self, path: Path, fingerprint: str, job_id: str) -> str | None:
        """Under the lock: bind the key to `job_id` (None), or the job id it is bound to."""
        with self._keys_locked():
            try:
                earlier, claimed_at = json.loads(path.read_text()), path.stat().st_mtime
            except FileNotFoundError:
                earlier = None
            # A claim whose job never appeared is a request that died before making it: taken over.
            if earlier is not None and not (time.time() - claimed_at > CLAIM_GRACE and not self._made(earlier["job_id"])):
                if earlier["fingerprint"] != fingerprint:
                    raise IdempotencyConflictError(
                        "this Idempotency-Key was already used for a different request: use a new key"
                    )
                return earlier["job_id"]
            atomic_write_bytes(path, json.dumps({"job_id": job_id, "fingerprint": fingerprint}).encode())
            return None

    def _made(self, job_id: str) -> bool:
        return (self.folder(job_id) / "job.json").exists()

    def claim_key(self, owner: str, key: str, fingerprint: str, job_id: str) -> str | None:
        """Bind `key` to `job_id` (None); or the job an identical earlier request made.

        An identical request still making its job is waited for (at most `CLAIM_GRACE`), so
        concurrent identical requests all answer with one job; if it gave up (released the
        key) or died, this request claims the key in its place.
        """
        path = self._key_path(owner, key)
        deadline = time.monotonic() + CLAIM_GRACE + 1
        while (earlier := self._take_key(path, fingerprint, job_id)) is not None:
            if self._made(earlier):
                return earlier
            if time.monotonic() > deadline:
                raise IdempotencyConflictError("a request with this Idempotency-Key is still being accepted: "
                                               "try again in a moment")
            time.sleep(0.05)
        return None

    def release_key(self, owner: str, key: str, job_id: str) -> None:
        """Free the key of a request that failed, unless another request has claimed it since."""
        path = self._key_path(owner, key)
        with self._keys_locked():
            try:
                if json.loads(path.read_text())["job_id"] == job_id:
                    path.unlink()
            except FileNotFoundError:
                pass

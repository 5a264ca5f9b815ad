"""Where the API puts jobs: Celery on Redis, or threads in the same process.

Both run `execute_job` on the same records, so the only difference is who runs it. The
in-process queue is what `make run` uses on a machine with nothing else installed: one
thread for Moshi jobs and one for codec jobs (so a long dialogue does not hold up a
200 ms encode), and on start it takes back the jobs a previous run left unfinished.
"""

import logging
import queue
import threading
from typing import Protocol

from .errors import QueueUnavailableError
from .jobs import Job, JobKind, JobState, JobStore
from .models import ModelCache
from .runner import execute_job
from .settings import Settings

log = logging.getLogger("moshi.workers")

HEAVY_QUEUE = "moshi.lm"  # Moshi dialogue: seconds to minutes of a big model
LIGHT_QUEUE = "moshi.codec"  # Mimi encode/decode: short
QUEUE_OF = {
    JobKind.DIALOGUE: HEAVY_QUEUE, JobKind.TRANSCRIBE: HEAVY_QUEUE, JobKind.TTS: HEAVY_QUEUE,
    JobKind.ENCODE: LIGHT_QUEUE, JobKind.DECODE: LIGHT_QUEUE,
}


class JobQueue(Protocol):
    name: str

    def submit(self, job: Job) -> None:
        """Hand the job to a worker; raises QueueUnavailableError when that cannot be done now."""

    def check(self) -> None:
        """Raise QueueUnavailableError when jobs cannot be queued now."""

    def depth(self) -> dict[str, int]:
        """Jobs waiting, per queue."""

    def workers(self) -> list[str]:
        """Names of the workers that answer now."""

    def close(self) -> None: ...


class LocalQueue:
    name = "in-process"

    def __init__(self, store: JobStore, models: ModelCache) -> None:
        self.store, self.models = store, models
        self._queues = {name: queue.Queue() for name in (HEAVY_QUEUE, LIGHT_QUEUE)}
        counts = {HEAVY_QUEUE: models.settings.dialogue_slots, LIGHT_QUEUE: 1}
        self._lanes = [  # (queue, one of the threads taking from it)
            (self._queues[name], threading.Thread(target=self._work, args=(self._queues[name],),
                                                  name=f"worker {name} {i}", daemon=True))
            for name, count in counts.items() for i in range(count)
        ]
        self._threads = [thread for _, thread in self._lanes]
        for thread in self._threads:
            thread.start()
        for job in sorted(store.all(), key=lambda j: j.created_at):
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                self.submit(job)

    def _work(self, jobs: queue.Queue) -> None:
        while (job_id := jobs.get()) is not None:
            try:
                execute_job(job_id, self.store, self.models)
            except Exception:  # execute_job records job failures itself; this is a store failure
                log.exception("job %s could not be run", job_id)

    def submit(self, job: Job) -> None:
        self._queues[QUEUE_OF[job.kind]].put(job.id)

    def check(self) -> None:
        if not all(t.is_alive() for t in self._threads):
            raise QueueUnavailableError("the in-process workers have stopped: restart the server")

    def depth(self) -> dict[str, int]:
        return {name: q.qsize() for name, q in self._queues.items()}

    def workers(self) -> list[str]:
        return [t.name for t in self._threads if t.is_alive()]

    def close(self) -> None:
        for jobs, _ in self._lanes:  # one stop mark per thread
            jobs.put(None)


class CeleryQueue:
    name = "celery"

    def __init__(self, settings: Settings) -> None:
        import redis
        from kombu.exceptions import OperationalError

        from .celery_app import make_celery

        self.url = settings.redis_url
        self.app = make_celery(settings)
        self.redis = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)
        self._connection_errors = (OperationalError, redis.RedisError, OSError)

    def _unavailable(self, exc: BaseException) -> QueueUnavailableError:
        return QueueUnavailableError(
            f"the job queue (Redis at {self._safe_url()}) cannot be reached ({type(exc).__name__}); "
            "nothing was queued: try again in a moment"
        )

    def _safe_url(self) -> str:
        # Never echo a password back to a client.
        url = self.url or ""
        if "@" in url:
            scheme, _, rest = url.partition("://")
            url = f"{scheme}://***@{rest.rpartition('@')[2]}"
        return url

    def submit(self, job: Job) -> None:
        try:
            self.app.send_task("moshi.run_job", args=[job.id], queue=QUEUE_OF[job.kind], task_id=job.id)
        except self._connection_errors as exc:
            raise self._unavailable(exc) from exc

    def check(self) -> None:
        try:
            self.redis.ping()
        except self._connection_errors as exc:
            raise self._unavailable(exc) from exc

    def depth(self) -> dict[str, int]:
        try:
            return {name: int(self.redis.llen(name)) for name in (HEAVY_QUEUE, LIGHT_QUEUE)}
        except self._connection_errors as exc:
            raise self._unavailable(exc) from exc

    def workers(self) -> list[str]:
        try:
            replies = self.app.control.ping(timeout=1.0)
        except self._connection_errors as exc:
            raise self._unavailable(exc) from exc
        return sorted(name for reply in replies for name in reply)

    def close(self) -> None:
        self.redis.close()


def make_queue(settings: Settings, store: JobStore, models: ModelCache | None = None) -> JobQueue:
    """Celery when REDIS_URL is set; else threads sharing `models` with the rest of the process."""
    if settings.redis_url:
        return CeleryQueue(settings)
    return LocalQueue(store, models or ModelCache(settings))

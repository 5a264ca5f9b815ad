"""Where the API puts jobs: Celery on Redis, or threads in the same process (`local_queue`).

Both run `execute_job` on the same records, so the only difference is who runs it. With
REDIS_URL set the API only queues: nothing here loads, or imports, a model.
"""

from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit, urlunsplit

from .errors import QueueUnavailableError
from .jobs import HEAVY_QUEUE, LIGHT_QUEUE, QUEUE_OF, Job, JobStore
from .settings import Settings

if TYPE_CHECKING:  # the models are imported only where jobs run, never by an API that only queues them
    from .models import ModelCache


POOL_TIMEOUT = 5.0  # seconds a request waits for one of Celery's pooled broker connections


def redacted_url(url: str) -> str:
    """A broker URL fit for a message or a log line: no password, no query (it may hold one)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")  # a lone "secret@" may be a password: not shown either
    shown = f"{user}:***@" if user and colon else "***@" if at else ""
    return urlunsplit((parts.scheme, shown + host, parts.path, "", ""))


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


class CeleryQueue:
    """Jobs as Celery tasks on Redis lists, which are FIFO: unlike `LocalQueue` there is no fair
    turn between keys here. What bounds one key's lead is MOSHI_KEY_MAX_JOBS, its limit of
    unfinished jobs: a key can put only so many ahead of another's."""

    name = "celery"

    def __init__(self, settings: Settings) -> None:
        import redis
        from kombu.exceptions import LimitExceeded, OperationalError

        from .celery_config import make_celery

        self.url = settings.redis_url
        self.app = make_celery(settings)
        self.redis = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)
        # LimitExceeded: every pooled connection stayed busy for POOL_TIMEOUT.
        self._connection_errors = (OperationalError, LimitExceeded, redis.RedisError, OSError)

    def _unavailable(self, exc: BaseException) -> QueueUnavailableError:
        return QueueUnavailableError(
            f"the job queue (Redis at {redacted_url(self.url or '')}) cannot be reached ({type(exc).__name__}); "
            "nothing was queued: try again in a moment"
        )

    def submit(self, job: Job) -> None:
        try:
            # Celery's own acquire would wait for a free producer without a limit.
            with self.app.producer_pool.acquire(block=True, timeout=POOL_TIMEOUT) as producer:
                self.app.send_task("moshi.run_job", args=[job.id], queue=QUEUE_OF[job.kind], task_id=job.id,
                                   producer=producer)
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
            # A connection of its own: the pooled ones are acquired without a time limit.
            with self.app.connection_for_write() as connection:
                replies = self.app.control.ping(timeout=1.0, connection=connection)
        except self._connection_errors as exc:
            raise self._unavailable(exc) from exc
        return sorted(name for reply in replies for name in reply)

    def close(self) -> None:
        self.redis.close()


def make_queue(settings: Settings, store: JobStore, models: "ModelCache | None" = None) -> JobQueue:
    """Celery when REDIS_URL is set; else threads sharing `models` with the rest of the process."""
    if settings.redis_url:
        return CeleryQueue(settings)
    from .local_queue import LocalQueue
    from .models import ModelCache

    return LocalQueue(store, models or ModelCache(settings))

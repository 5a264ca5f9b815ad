"""The Celery application's configuration, shared by the worker (`celery_app`) and the API,
which only sends tasks with it and so must not import what runs them.

The settings follow what long GPU jobs need: a worker reserves one job at a time
(prefetch 1), acknowledges a job only once it is done (late ack), and hands it back when
its process dies (reject on worker lost), so a killed worker loses nothing; the
visibility timeout exceeds the longest job, so Redis never hands a running job to a second
worker. `execute_job` bounds the attempts of a job that keeps killing workers.
"""

from celery import Celery

from .jobs import LIGHT_QUEUE
from .settings import Settings


def make_celery(settings: Settings) -> Celery:
    url = settings.redis_url or "redis://127.0.0.1:6379/0"
    app = Celery("moshi", broker=url, backend=url)
    transport = {"visibility_timeout": settings.visibility_timeout}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=int(settings.job_ttl_seconds),
        task_default_queue=LIGHT_QUEUE,
        broker_connection_retry_on_startup=True,
        # A web request must not hang on a dead broker: fail fast, the API answers 503.
        broker_connection_timeout=2,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        redis_socket_connect_timeout=2,
        redis_socket_timeout=10,
        worker_hijack_root_logger=False,
    )
    return app

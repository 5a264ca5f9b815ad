"""The Celery application: Redis as broker and result backend, one task that runs a job.

Start a worker per GPU (one process each, see the README):

    REDIS_URL=redis://localhost:6379/0 CUDA_VISIBLE_DEVICES=0 \
        celery -A workers worker -Q moshi.lm,moshi.codec -P threads -c 8 -n gpu0@%h

With the threads pool, the jobs a process runs at once share its models, and its dialogue
jobs share batched LM steps (`MOSHI_DIALOGUE_SLOTS` at a time); the prefork pool (`-c 1`)
runs one job per process, each isolated from the others' crashes.

The settings follow what long GPU jobs need: a worker reserves one job at a time
(prefetch 1), acknowledges a job only once it is done (late ack), and hands it back when
its process dies (reject on worker lost), so a killed worker loses nothing; the
visibility timeout exceeds the longest job, so Redis never hands a running job to a second
worker. `execute_job` bounds the attempts of a job that keeps killing workers.
"""

import logging
import threading

from celery import Celery, signals

from .jobs import JobStore
from .models import ModelCache
from .queue import LIGHT_QUEUE
from .runner import execute_job
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


settings = Settings.from_env()
app = make_celery(settings)
_store: JobStore | None = None
_models: ModelCache | None = None
_init_lock = threading.Lock()  # the threads pool starts several tasks at once


@signals.worker_process_init.connect
def _init_process(**_) -> None:
    # Nothing heavy here: Celery kills a pool process that takes more than a few seconds to
    # start. Models load on the first job that needs them (ModelCache).
    logging.getLogger("moshi").setLevel(logging.INFO)


@app.task(name="moshi.run_job", ignore_result=False)
def run_job(job_id: str) -> str:
    global _store, _models
    with _init_lock:
        if _store is None:
            _store, _models = JobStore(settings.storage_dir), ModelCache(settings)
    execute_job(job_id, _store, _models)
    return job_id

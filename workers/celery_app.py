"""The Celery application: Redis as broker and result backend, one task that runs a job.

Start a worker per GPU (one process each; docs/deployment.md has the full set-up):

    REDIS_URL=redis://localhost:6379/0 CUDA_VISIBLE_DEVICES=0 \
        celery -A workers worker -Q moshi.lm,moshi.codec -P threads -c 8 -n gpu0@%h

With the threads pool, the jobs a process runs at once share its models, and its dialogue
jobs share batched LM steps (`MOSHI_DIALOGUE_SLOTS` at a time); the prefork pool (`-c 1`)
runs one job per process, each isolated from the others' crashes.

The settings are read at import, so a bad variable stops `celery worker` at start with one
line, before any job is taken.
"""

import logging
import threading

from celery import signals

from .celery_config import make_celery
from .errors import SettingsError
from .jobs import JobStore
from .models import ModelCache
from .runner import execute_job
from .settings import Settings

try:
    settings = Settings.from_env()
except SettingsError as exc:
    raise SystemExit(str(exc)) from None  # one line on stderr, not Celery's "unable to load" traceback
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

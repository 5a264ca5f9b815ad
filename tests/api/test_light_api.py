"""The API process that only queues (REDIS_URL set) imports no model code, and the workers
package has no import cycle."""

import json
import os
import subprocess
import sys

import pytest
from servers import REPO_DIR

HEAVY = ("moshi_core.nn", "moshi_core.models", "moshi_core.inference", "moshi_core.engines", "workers.models",
         "workers.runner", "workers.pipelines")

LIGHT_API = f"""
import json, sys, tempfile
import api.__main__
from api.app import create_api
from fastapi.testclient import TestClient
from workers.settings import Settings

app = create_api(Settings(redis_url="redis://127.0.0.1:6379/0", storage_dir=tempfile.mkdtemp()))
with TestClient(app) as client:  # runs the lifespan: the job store and the Celery queue
    assert client.get("/healthz").status_code == 200
print(json.dumps(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    return subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO_DIR, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_api_that_only_queues_imports_no_model_code():
    done = _python(LIGHT_API)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize("first, second", [("workers.queue", "workers.celery_app"),
                                           ("workers.celery_app", "workers.queue")])
def test_the_queue_and_the_celery_app_import_in_either_order(first, second):
    done = _python(f"import {first}; import {second}")
    assert done.returncode == 0, done.stderr

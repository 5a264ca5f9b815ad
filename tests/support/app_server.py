"""The web app started for real, as a subprocess on a free port, for tests that talk to it."""

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port

REPO_DIR = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def serve_app(mimi_checkpoint: Path, tiny_moshi: Path, **env: str) -> Iterator[str]:
    """`python app.py` on the tiny checkpoint (float32, CPU, offline); yields its base URL."""
    port = free_port()
    env = {**os.environ, "MOSHI_MIMI": str(mimi_checkpoint), "MOSHI_MODEL": str(tiny_moshi), "MOSHI_DTYPE": "float32",
           "MOSHI_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "MOSHI_STORAGE_DIR": tempfile.mkdtemp(prefix="moshi-jobs-"), **env}
    # A file, not a pipe: nobody reads the output while the app runs, and a full pipe would stall it.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO_DIR, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    log.seek(0)
                    pytest.fail(f"app did not start:\n{log.read()}")
                time.sleep(0.5)
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a stuck server must not outlive its test
                proc.kill()
                proc.wait()

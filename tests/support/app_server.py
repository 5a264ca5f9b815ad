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


class AppProcess:
    """`python app.py` on the tiny checkpoint (float32, CPU, offline), started on a free port;
    `wait_up` until it answers, `stop` at the end. `python` and `cwd`: another environment's
    interpreter and copy of the app (an assembled Space)."""

    def __init__(self, mimi_checkpoint: Path, tiny_moshi: Path, *, python: str = sys.executable, cwd: Path = REPO_DIR,
                 **env: str) -> None:
        port = free_port()
        env = {**os.environ, "MOSHI_MIMI": str(mimi_checkpoint), "MOSHI_MODEL": str(tiny_moshi),
               "MOSHI_DTYPE": "float32", "MOSHI_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
               "MOSHI_STORAGE_DIR": tempfile.mkdtemp(prefix="moshi-jobs-"), **env}
        # A file, not a pipe: nobody reads the output while the app runs, and a full pipe would stall it.
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([python, "app.py", "--port", str(port)], cwd=cwd, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.address = f"127.0.0.1:{port}"
        self.url = f"http://{self.address}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                    assert response.status == 200
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    pytest.fail(f"app did not start:\n{self.output()}")
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a stuck server must not outlive its test
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def serve_app(mimi_checkpoint: Path, tiny_moshi: Path, **env: str) -> Iterator[str]:
    """An `AppProcess` for the length of a block; yields its base URL."""
    app = AppProcess(mimi_checkpoint, tiny_moshi, **env)
    try:
        app.wait_up()
        yield app.url
    finally:
        app.stop()

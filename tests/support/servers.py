"""Real servers for the API tests: redis-server, `python -m api`, `celery -A workers worker`."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def compose_redis_args() -> list[str]:
    """The redis-server arguments of our compose file: the tests run Redis exactly as it does."""
    import yaml

    command = yaml.safe_load((REPO_DIR / "compose.yaml").read_text())["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    return command[1:]


class Redis:
    """A redis-server of the test's own, with the persistence settings of our compose file."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> "Redis":
        self.proc = subprocess.Popen(
            ["redis-server", *compose_redis_args(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 20, "redis-server to start")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)  # redis-server flushes its append-only file and exits
            self.proc.wait(timeout=20)
            self.proc = None


class Process:
    """A server process whose output goes to a log file, shown when a test fails."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.log = name, log_dir / f"{name}.log"
        self._log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(args, cwd=REPO_DIR, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()


def start_api(env: dict[str, str], log_dir: Path, name: str = "api") -> tuple[Process, str]:
    port = free_port()
    proc = Process(name, [sys.executable, "-m", "api", "--port", str(port)], env, log_dir)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"the API exited:\n{proc.output()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(up, 60, "the API to start")
    return proc, url


@contextlib.contextmanager
def running_api(env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """`start_api` for the length of a block: yields its URL, prints its log if the block fails."""
    api, url = start_api(env, log_dir)
    try:
        yield url
    except BaseException:
        print(api.output())
        raise
    finally:
        api.stop()


def start_worker(env: dict[str, str], log_dir: Path, name: str, concurrency: int = 1, pool: str = "prefork") -> Process:
    return Process(name, [
        sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "moshi.lm,moshi.codec", "-P", pool,
        "-c", str(concurrency), "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "info",
    ], env, log_dir)


@contextlib.contextmanager
def serving_in_thread(app) -> Iterator[str]:
    """An ASGI app served by uvicorn in a thread of the test process, on a free loopback port:
    yields its base address (`127.0.0.1:PORT`)."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the server to start")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)

"""Live conversations over two app processes behind HAProxy, run with our deploy/haproxy.cfg.

A process takes callers until its slots are full, the next caller lands on the other one,
and a process told to stop (SIGTERM) drains: new callers go elsewhere while its conversation
in progress runs to its end, and then it stops by itself.
"""

import asyncio
import json
import shutil
import signal
import socket
import urllib.error
import urllib.request

import pytest
import websockets
from app_server import AppProcess
from live_client import last_message_before_close
from servers import REPO_DIR, Process, free_port, wait_until

pytestmark = pytest.mark.e2e  # real servers and a real balancer

SLOTS = 2
# Each caller has a key of its own (a key holds one conversation at a time); the balancer's
# checks carry none.
KEYS = [f"caller{i}" for i in range(5)]
HANDSHAKE = b"\x00" + bytes(8)
METADATA = 4
# The first caller of a process waits for its model to load, and its first steps are slow
# (15 s seen on a busy machine): generous limits, met at once when all is well.
LOAD_SECONDS = 180
STEP_SECONDS = 120
SILENCE = b"\x01" + bytes(2 * 1920)  # one frame of int16 PCM


def capacity(app: AppProcess) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(app.url + "/readyz/live", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def active(app: AppProcess) -> int:
    return capacity(app)[1]["active"]


def haproxy_server_status(stats_socket: str, backend: str, server: str) -> str:
    """UP, DOWN, ... as HAProxy sees `backend/server` now ("" while it does not answer yet)."""
    try:
        return _server_status(stats_socket, backend, server)
    except OSError:
        return ""


def _server_status(stats_socket: str, backend: str, server: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(stats_socket)
        s.sendall(b"show stat\n")
        csv = b""
        while chunk := s.recv(65536):
            csv += chunk
    for row in csv.decode().splitlines():
        fields = row.split(",")
        if fields[:2] == [backend, server]:
            return fields[17]  # the `status` column: UP, DOWN, ...
    raise AssertionError(f"no server {backend}/{server} in HAProxy's stats:\n{csv.decode()}")


async def exchange(ws, frames: int) -> int:
    """Talk for `frames` frames of silence, as a microphone would; how many of Moshi's audio
    frames came back (the first frame only primes the model, so one is sent ahead)."""
    await ws.send(SILENCE)
    received = 0
    async with asyncio.timeout(STEP_SECONDS):
        for _ in range(frames):
            await ws.send(SILENCE)
            while (await ws.recv())[0] != 1:  # its text pieces
                pass
            received += 1
    return received


async def call(url: str, key: str):
    """A live caller through `url`, once the server has greeted it (after its news of the model's load)."""
    ws = await websockets.connect(f"{url}&api_key={key}")
    async with asyncio.timeout(LOAD_SECONDS):
        while (message := await ws.recv())[0] == METADATA:
            pass
    assert message == HANDSHAKE
    return ws


@pytest.fixture
def apps(mimi_checkpoint, tiny_moshi):
    # PyTorch's own CPU path, not our kernels: their build (after a change) is not this test's.
    started = [AppProcess(mimi_checkpoint, tiny_moshi, MOSHI_LIVE_SLOTS=str(SLOTS), MOSHI_LIVE_IDLE_SECONDS="120",
                          MOSHI_CPU_KERNELS="0", MOSHI_API_KEYS=",".join(KEYS)) for _ in range(2)]
    try:
        for app in started:  # both start at once: half the wait
            app.wait_up(LOAD_SECONDS)
        yield started
    finally:
        for app in started:
            app.stop()


@pytest.fixture
def balancer(apps, tmp_path):
    """HAProxy on deploy/haproxy.cfg in front of both apps, checking every 100 ms; yields
    (its websocket URL, its stats socket)."""
    haproxy = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if haproxy is None:
        pytest.fail("haproxy is not installed: run `make test`, which installs it")
    stats_socket = str(tmp_path / "haproxy.sock")
    (tmp_path / "stats.cfg").write_text(f"global\n    stats socket {stats_socket} mode 600 level admin\n")
    port = free_port()
    env = {"MOSHI_LB_BIND": f"127.0.0.1:{port}", "MOSHI_APP_0": apps[0].address, "MOSHI_APP_1": apps[1].address,
           "MOSHI_LIVE_SLOTS": str(SLOTS), "MOSHI_LB_CHECK_INTERVAL": "100ms"}
    proxy = Process("haproxy", [haproxy, "-db", "-f", str(REPO_DIR / "deploy" / "haproxy.cfg"),
                                "-f", str(tmp_path / "stats.cfg")], env, tmp_path)
    try:
        wait_until(lambda: all(haproxy_server_status(stats_socket, "live", server).startswith("UP")
                               for server in ("gpu0", "gpu1")), 30, "HAProxy to see both apps up")
        yield f"ws://127.0.0.1:{port}/api/chat?codec=pcm", stats_socket
    finally:
        proxy.stop()


def test_callers_fill_one_process_then_the_next_and_a_stopping_process_drains(apps, balancer):
    a, b = apps
    url, stats_socket = balancer

    async def main():
        first, second = await call(url, KEYS[0]), await call(url, KEYS[1])
        assert (active(a), active(b)) == (2, 0)
        assert capacity(a) == (503, {"free": 0, "slots": SLOTS, "active": 2, "draining": False})
        third = await call(url, KEYS[2])  # a is full: the caller lands on b
        assert (active(a), active(b)) == (2, 1)
        assert capacity(b)[0] == 200

        await second.close()
        await third.close()
        wait_until(lambda: (active(a), active(b)) == (1, 0), 10, "the hung-up conversations to end")
        assert await exchange(first, 3) == 3

        a.proc.send_signal(signal.SIGTERM)  # stop a: it drains first
        wait_until(lambda: capacity(a)[1]["draining"], 10, "a to drain")
        assert capacity(a) == (503, {"free": 1, "slots": SLOTS, "active": 1, "draining": True})
        refused = await websockets.connect(a.url.replace("http", "ws") + f"/api/chat?codec=pcm&api_key={KEYS[4]}")
        message, code = await last_message_before_close(refused)
        assert code == 1013 and message.startswith(b"\x05busy: this server is draining"), message
        wait_until(lambda: haproxy_server_status(stats_socket, "live", "gpu0").startswith("DOWN"), 10,
                   "HAProxy to see a draining")
        fourth = await call(url, KEYS[3])  # a has a free slot but drains: the caller lands on b
        assert (active(a), active(b)) == (1, 1)

        # a's conversation goes on meanwhile, to its end: the caller hangs up.
        assert await exchange(first, 5) == 5
        assert a.proc.poll() is None
        await first.close()
        wait_until(lambda: a.proc.poll() is not None, 15, "a to stop once drained")
        assert await exchange(fourth, 2) == 2  # b is untouched
        await fourth.close()

    try:
        asyncio.run(main())
    except BaseException:
        for name, app in zip("ab", apps):
            print(f"app {name}:\n{app.output()[-4000:]}")
        raise

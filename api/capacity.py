"""Live capacity for load balancers, and draining a process before it stops.

`GET /readyz/live` answers whether this process can take one more live conversation:
200 `{"free", "slots", "active", "draining"}` when it can, 503 with the same body when every
slot is taken or it drains. A balancer health-checks it to send each caller to a process
with a free slot (docs/deployment.md, "Scale-out"). It is open, like `/readyz`. Until the
first conversation loads the engine, `free` and `slots` are null and the answer is 200.

Draining: SIGTERM makes the process refuse new live callers (and answer 503 here) while the
conversations in progress go on to their end; the server stops when the last one ends, or
after `max_seconds` (no conversation lasts longer). With none in progress it stops at once, as
before. A second SIGTERM, or SIGINT (Ctrl+C), stops it at once. SIGUSR1 drains without
stopping, for an operator who stops the process later.
"""

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from .live_driver import LiveDriver

LIVE_READY_PATH = "/readyz/live"
DRAIN_POLL_SECONDS = 0.2
log = logging.getLogger("moshi.api")

SignalHandler = Callable[[int, FrameType | None], object]


def capacity(driver: LiveDriver) -> tuple[int, dict]:
    """The HTTP status and body of `GET /readyz/live`."""
    free = driver.free_slots
    body = {"free": free, "slots": driver.num_slots, "active": len(driver.sessions), "draining": driver.draining}
    return (503 if driver.draining or free == 0 else 200), body


async def _stop_when_drained(driver: LiveDriver, stop_server: SignalHandler, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    while driver.sessions and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_SECONDS)
    log.warning("drained (%d live conversations left): stopping", len(driver.sessions))
    stop_server(signal.SIGTERM, None)


def _drain(driver: LiveDriver) -> None:
    if not driver.draining:
        log.warning("draining: no new live conversations; %d in progress go on to their end", len(driver.sessions))
    driver.drain()


@contextlib.asynccontextmanager
async def drain_on_signals(driver: LiveDriver, max_seconds: float) -> AsyncIterator[None]:
    """For the server's lifetime, SIGTERM drains then stops, SIGUSR1 drains (see the module).

    Installed over the server's own SIGTERM handler (uvicorn's, which stops it), which is
    called once drained. Nothing is installed outside the main thread (a test client's app)
    or where the server has no SIGTERM handler of its own to call."""
    stop_server = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(stop_server):
        yield
        return
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []  # the one drain-then-stop task, kept from the garbage collector

    def start_stopping() -> None:
        if stopping or not driver.sessions:  # a second SIGTERM, or nothing to wait for
            stop_server(signal.SIGTERM, None)
            return
        _drain(driver)
        stopping.append(asyncio.create_task(_stop_when_drained(driver, stop_server, max_seconds)))

    # Signal handlers only hand over to the event loop: it may be in the middle of anything.
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda sig, frame: loop.call_soon_threadsafe(_drain, driver))
    signal.signal(signal.SIGTERM, lambda sig, frame: loop.call_soon_threadsafe(start_stopping))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, stop_server)
        signal.signal(signal.SIGUSR1, previous_usr1)
        for task in stopping:
            task.cancel()


def create_capacity_router(driver: LiveDriver, max_seconds: float) -> APIRouter:
    """`GET /readyz/live`, and the drain signals for the life of the app that includes it."""

    def lifespan(app: FastAPI) -> contextlib.AbstractAsyncContextManager[None]:
        return drain_on_signals(driver, max_seconds)

    router = APIRouter(tags=["service"], lifespan=lifespan)

    @router.get(LIVE_READY_PATH, summary="This process can take one more live conversation (for load balancers)")
    async def live_ready() -> JSONResponse:
        status, body = capacity(driver)
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    return router

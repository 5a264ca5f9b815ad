"""Limits on every request body, whatever the route: its size, and how long it may take to arrive.

Both are pure ASGI middleware, so they act before FastAPI reads or parses anything.
"""

import asyncio

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moshi_core.formats.pcm import SAMPLE_RATE
from workers.errors import UploadTooLargeError
from workers.settings import Settings

from .errors import error_response

# 500 ms of int16 PCM (a browser sends 80 ms at a time, an Ogg/Opus page far less): more in
# one message is refused before it is decoded.
MAX_MESSAGE_BYTES = 1 + SAMPLE_RATE
# What uvicorn may buffer of one websocket message before our check sees it (its default is 16 MiB):
# the front doors pass it to uvicorn.
WS_MAX_SIZE = 4 * MAX_MESSAGE_BYTES


class UploadLimit:
    """Refuses a request body over the limit before it is read (413), whatever the route.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"the request is over this server's upload limit of {self.max_bytes / 2**20:g} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, "too_large", self._message(), path=scope["path"])(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise UploadTooLargeError(self._message())
            return message

        await self.app(scope, counted, send)


class _BodyTimedOut(Exception):
    """Ends the route that was reading a body too slow; the 408 is already sent."""


class BodyTimeout:
    """Answers 408 and closes the connection when a request body does not arrive in time:
    all of it within `total` seconds, and never `idle` seconds without a byte.

    A client trickling a body can then hold a connection (and the route reading it) for a
    bounded time only. Once the body is whole, `receive` is passed through untouched: a
    streaming answer waiting for the client to disconnect is not limited.
    """

    def __init__(self, app: ASGIApp, total: float, idle: float) -> None:
        self.app, self.total, self.idle = app, total, idle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total
        body_done = started = timed_out = False

        async def timed() -> Message:
            nonlocal body_done, timed_out
            if body_done:
                return await receive()
            wait = min(self.idle, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0))
            except TimeoutError:
                timed_out = True
                if not started:
                    what = f"{self.idle:g} s without data" if wait == self.idle else f"over {self.total:g} s"
                    await error_response(408, "request_timeout", f"the request body took too long ({what}): "
                                         "send it at once", {"Connection": "close"},
                                         path=scope["path"])(scope, receive, send)
                raise _BodyTimedOut from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if timed_out:
                return  # what the route answers after its body was cut off: the 408 went instead
            started = True
            await send(message)

        try:
            await self.app(scope, timed, guarded)
        except _BodyTimedOut:
            pass


def install_limits(app: FastAPI, settings: Settings) -> None:
    """The body limits of `settings` on every route of `app`."""
    # Multipart framing adds a little to the file itself.
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes + 64 * 1024)
    app.add_middleware(BodyTimeout, total=settings.body_timeout_seconds, idle=settings.body_idle_seconds)

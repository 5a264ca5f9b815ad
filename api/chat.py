"""`/api/chat`: live conversation over a websocket, in the protocol of Kyutai's servers (docs/api.md).

Every message is binary, its first byte the kind:

- `0x00` handshake (server -> client, once, when the conversation starts): protocol version
  and model version, u32 little-endian each, both 0, as Kyutai's Rust server sends them;
- `0x01` audio, both ways: Ogg/Opus at 24 kHz mono, as Kyutai's clients send it. With
  `?codec=pcm` (our browser client) the payload is raw little-endian int16 mono at 24 kHz
  instead, any length in, one 1920-sample frame (80 ms) per message out;
- `0x02` text (server -> client): Moshi's next text piece, UTF-8;
- `0x04` metadata (server -> client), JSON, only with `?progress=1` (our browser client: Kyutai's
  clients expect the handshake first): while the model loads, before the handshake, every
  `LOAD_REPORT_SECONDS`: `{"loading": {"model", "stage", ...}, "text": "moshi: downloading ..."}`;
- `0x05` error (server -> client), then the socket closes: a bad query argument, every
  slot busy, the server draining before it stops (api/capacity.py) or the caller's API key
  holding its `max_per_key` conversations already (all close with 1013, "try again later"),
  the time limit reached, no audio for `idle_seconds`, a message of more than `MAX_MESSAGE_BYTES`,
  audio sent faster than real time (see `LiveDriver`), the conversation's own failure.

Query arguments as Kyutai's Rust server reads them: `text_temperature`, `text_topk`,
`audio_temperature`, `audio_topk`; one generator drives both streams here, so `seed` (or
else `text_seed`, or else `audio_seed`) seeds it. Its other arguments (`pad_mult`,
`repetition_penalty`, ...) are accepted and ignored. Each argument is checked against its
domain (finite temperatures, top-k and seed in range) before a slot is taken. Other kinds of message are ignored, as
Kyutai's Python server does. `GET /api/chat/stats` counts frames per conversation.
"""

import asyncio
import collections
import dataclasses
import json
import math
import statistics
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse

from api.capacity import create_capacity_router
from api.live_driver import LiveDriver, LiveSession
from moshi_core.errors import InvalidParameterError, LiveBusyError, LiveInputError, MoshiError
from moshi_core.formats.pcm import SAMPLE_RATE, pcm16_bytes, pcm16_from_bytes
from moshi_core.loading.progress import LoadStatus
from moshi_core.params import SamplingParams

from .limits import MAX_MESSAGE_BYTES

HANDSHAKE = b"\x00" + struct.pack("<II", 0, 0)
# What a vanished caller raises on send (uvicorn's ClientDisconnected is an OSError).
GONE = (WebSocketDisconnect, OSError, RuntimeError)
AUDIO, TEXT, METADATA, ERROR = 1, 2, 4, 5
LOAD_REPORT_SECONDS = 1.0
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"live.js": "text/javascript", "live-worklet.js": "text/javascript"}
# Query argument -> SamplingParams field (whose own check bounds the temperatures).
SAMPLING_ARGS = {"text_temperature": ("temp_text", float), "text_topk": ("top_k_text", int),
                 "audio_temperature": ("temp", float), "audio_topk": ("top_k", int)}
MAX_TOP_K = 2**31 - 1  # beyond the vocabulary it changes nothing; beyond int32 torch may overflow
MAX_SEED = 2**63  # exclusive: a seed of the upstream protocol is a signed 64-bit integer (the sampler takes [-2**63, 2**64))


class OpusCodec:
    """Ogg/Opus streams both ways, with Kyutai's own Opus bindings."""

    def __init__(self) -> None:
        import sphn

        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)

    def decode(self, payload: bytes) -> np.ndarray:
        return self._reader.append_bytes(payload)

    def encode(self, pcm: np.ndarray) -> bytes:
        return self._writer.append_pcm(pcm)  # b"" until an Ogg page is complete


class PcmCodec:
    """Raw int16 little-endian samples: what a browser has without an Opus encoder."""

    def decode(self, payload: bytes) -> np.ndarray:
        return pcm16_from_bytes(payload)

    def encode(self, pcm: np.ndarray) -> bytes:
        return pcm16_bytes(pcm)


def parse_session_args(query: Mapping[str, str], defaults: SamplingParams) -> tuple[SamplingParams, int | None, str]:
    """Sampling parameters, seed and codec from the query; InvalidParameterError if malformed."""
    overrides = {}
    for arg, (name, kind) in SAMPLING_ARGS.items():
        if arg in query:
            overrides[name] = _number(query, arg, kind, 0, MAX_TOP_K) if kind is int else _number(query, arg, kind)
    seed_arg = next((a for a in ("seed", "text_seed", "audio_seed") if a in query), None)
    seed = None if seed_arg is None else _number(query, seed_arg, int, 0, MAX_SEED - 1)
    codec = query.get("codec", "opus")
    if codec not in ("opus", "pcm"):
        raise InvalidParameterError(f"codec must be opus or pcm, not {codec!r}")
    return dataclasses.replace(defaults, **overrides), seed, codec


def _number(query: Mapping[str, str], arg: str, kind: type, low: int | None = None,
            high: int | None = None) -> int | float:
    """The argument as a `kind`: an integer within [low, high], or a finite float."""
    text = query[arg]
    what = "an integer" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise InvalidParameterError(f"{arg} must be {what}, not {text[:40]!r}") from None
    if not math.isfinite(value) if low is None else not low <= value <= high:
        bounds = "a finite number" if low is None else f"an integer between {low} and {high}"
        raise InvalidParameterError(f"{arg} must be {bounds}, not {text[:40]!r}")
    return value


class _Ended(Exception):
    """The conversation ends for a reason the caller is told (the error message) and a close code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def _end(ws: WebSocket, message: str, code: int) -> None:
    """An error message, then close; the caller may already be gone."""
    try:
        await ws.send_bytes(bytes([ERROR]) + message.encode())
        await ws.close(code)
    except GONE:
        pass


async def _receive(ws: WebSocket, session: LiveSession, codec: OpusCodec | PcmCodec, idle_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + idle_seconds  # moved on by each audio message
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                message = await ws.receive()
        except TimeoutError:
            raise _Ended(f"idle: no audio for {idle_seconds:g} s, the conversation ended", 1000) from None
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data and len(data) > MAX_MESSAGE_BYTES:
            raise _Ended(f"a message of {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES} (send audio "
                         "as it is recorded, in pieces of at most 500 ms)", 1009)
        if data and data[0] == AUDIO:
            try:
                session.push(codec.decode(data[1:]))
            except LiveInputError as exc:
                raise _Ended(str(exc), 1008) from None
            deadline = loop.time() + idle_seconds


async def _send(ws: WebSocket, session: LiveSession, codec: OpusCodec | PcmCodec) -> None:
    while True:
        frame = await session.next_frame()
        if frame.error is not None:
            raise _Ended(f"error: {frame.error}", 1011)
        if frame.audio is not None:
            payload = codec.encode(frame.audio)
            if payload:
                await ws.send_bytes(bytes([AUDIO]) + payload)
        if frame.text:
            await ws.send_bytes(bytes([TEXT]) + frame.text.encode())


async def run_both(*coroutines) -> None:
    """Until the caller hangs up or one side ends the conversation (its exception goes on)."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = task.exception()
            if error is not None and not isinstance(error, GONE):
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _percentile_ms(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return None
    return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 2)


async def _engine_reporting_load(ws: WebSocket, driver: LiveDriver, loading: Callable[[], LoadStatus | None]):
    """The driver's engine; while it loads, the caller is told how the load goes (`0x04`)."""
    task = asyncio.ensure_future(driver.engine())
    while not task.done():
        if (status := loading()) is not None:
            report = {"loading": status.to_dict(), "text": status.describe()}
            await ws.send_bytes(bytes([METADATA]) + json.dumps(report).encode())
        await asyncio.wait([task], timeout=LOAD_REPORT_SECONDS)  # a caller who hangs up leaves the load going
    return task.result()


def create_chat_router(driver: LiveDriver, max_seconds: float, idle_seconds: float = 30.0,
                       max_per_key: int = 1, loading: Callable[[], LoadStatus | None] = lambda: None,
                       open_per_key: collections.Counter[str] | None = None) -> APIRouter:
    """The websocket, its stats and the browser client's files; `max_seconds` per conversation,
    which ends after `idle_seconds` without audio; at most `max_per_key` open at once per API
    key (the one `KeyGuard` found; without keys there is no such limit), counted in
    `open_per_key` (shared with `/v1/realtime`'s, which serves the same driver)."""
    router = APIRouter(tags=["live"])
    router.include_router(create_capacity_router(driver, max_seconds))
    open_per_key = collections.Counter() if open_per_key is None else open_per_key

    @router.websocket("/api/chat")
    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        key = ws.scope.get("state", {}).get("api_key", "")
        if key and open_per_key[key] >= max_per_key:
            await _end(ws, f"busy: this API key already has {open_per_key[key]} conversation(s) open, the most "
                           "one key may hold at once; end one and try again", 1013)
            return
        # Checked and counted with no await between: two sockets of one key cannot both pass.
        open_per_key[key] += 1
        try:
            await _serve(ws)
        finally:
            open_per_key[key] -= 1
            if not open_per_key[key]:
                del open_per_key[key]

    async def _serve(ws: WebSocket) -> None:
        try:
            wants_progress = ws.query_params.get("progress") == "1"
            engine = await _engine_reporting_load(ws, driver, loading if wants_progress else lambda: None)
            sampling, seed, codec_name = parse_session_args(ws.query_params, engine.sampling)
            session = await driver.open(sampling, seed)
        except LiveBusyError as exc:
            open_now = len(driver.sessions)
            await _end(ws, f"busy: {exc} ({open_now} conversation{'' if open_now == 1 else 's'} in progress); "
                           "try again in a moment", 1013)
            return
        except MoshiError as exc:
            await _end(ws, f"error: {exc}", 1008 if isinstance(exc, InvalidParameterError) else 1011)
            return
        except GONE:  # hung up while the model loaded
            return
        codec = PcmCodec() if codec_name == "pcm" else OpusCodec()
        try:
            await ws.send_bytes(HANDSHAKE)
            async with asyncio.timeout(max_seconds):
                await run_both(_receive(ws, session, codec, idle_seconds), _send(ws, session, codec))
        except TimeoutError:
            await driver.close(session)  # the slot is free by the time the caller hears of the end
            await _end(ws, f"time limit: conversations end after {max_seconds:g} s", 1000)
        except _Ended as ended:
            await driver.close(session)
            await _end(ws, str(ended), ended.code)
        except GONE:
            pass  # the caller hung up
        finally:
            await driver.close(session)  # a second close is a no-op

    @router.get("/api/chat/stats")
    def stats() -> dict:
        """Conversations in progress and recently ended, with their frame counts."""
        steps = list(driver.step_seconds)
        return {
            "slots": driver.num_slots,
            "active": [dataclasses.asdict(s.stats) for s in driver.sessions],
            "ended": [dataclasses.asdict(s) for s in driver.ended],
            "step_ms": {"count": len(steps), "p50": _percentile_ms(steps, 50), "p95": _percentile_ms(steps, 95)},
        }

    @router.get("/api/chat/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no file {name}")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    return router

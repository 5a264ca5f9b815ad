"""`/api/chat`: live conversation over a websocket, in the protocol of Kyutai's servers (docs/api.md).

Every message is binary, its first byte the kind:

- `0x00` handshake (server -> client, once, when the conversation starts): protocol version
  and model version, u32 little-endian each, both 0, as Kyutai's Rust server sends them;
- `0x01` audio, both ways: Ogg/Opus at 24 kHz mono, as Kyutai's clients send it. With
  `?codec=pcm` (our browser client) the payload is raw little-endian int16 mono at 24 kHz
  instead, any length in, one 1920-sample frame (80 ms) per message out;
- `0x02` text (server -> client): Moshi's next text piece, UTF-8;
- `0x05` error (server -> client), then the socket closes: a bad query argument, every
  slot busy, the time limit reached.

Query arguments as Kyutai's Rust server reads them: `text_temperature`, `text_topk`,
`audio_temperature`, `audio_topk`; one generator drives both streams here, so `seed` (or
else `text_seed`, or else `audio_seed`) seeds it. Its other arguments (`pad_mult`,
`repetition_penalty`, ...) are accepted and ignored. Other kinds of message are ignored, as
Kyutai's Python server does. `GET /api/chat/stats` counts frames per conversation.
"""

import asyncio
import dataclasses
import statistics
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse

from api.live_driver import LiveDriver, LiveSession
from moshi_core.errors import InvalidParameterError, LiveBusyError, MoshiError
from moshi_core.formats.pcm import SAMPLE_RATE, pcm16_bytes, pcm16_from_bytes
from moshi_core.params import SamplingParams

HANDSHAKE = b"\x00" + struct.pack("<II", 0, 0)
# What a vanished caller raises on send (uvicorn's ClientDisconnected is an OSError).
GONE = (WebSocketDisconnect, OSError, RuntimeError)
AUDIO, TEXT, ERROR = 1, 2, 5
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"live.js": "text/javascript", "live-worklet.js": "text/javascript"}
# Query argument -> SamplingParams field.
SAMPLING_ARGS = {"text_temperature": ("temp_text", float), "text_topk": ("top_k_text", int),
                 "audio_temperature": ("temp", float), "audio_topk": ("top_k", int)}


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
            overrides[name] = _number(query, arg, kind)
    seed_arg = next((a for a in ("seed", "text_seed", "audio_seed") if a in query), None)
    seed = None if seed_arg is None else _number(query, seed_arg, int)
    codec = query.get("codec", "opus")
    if codec not in ("opus", "pcm"):
        raise InvalidParameterError(f"codec must be opus or pcm, not {codec!r}")
    return dataclasses.replace(defaults, **overrides), seed, codec


def _number(query: Mapping[str, str], arg: str, kind: type) -> int | float:
    try:
        return kind(query[arg])
    except ValueError:
        raise InvalidParameterError(f"{arg} must be a number, not {query[arg]!r}") from None


async def _end(ws: WebSocket, message: str, code: int) -> None:
    """An error message, then close; the caller may already be gone."""
    try:
        await ws.send_bytes(bytes([ERROR]) + message.encode())
        await ws.close(code)
    except GONE:
        pass


async def _receive(ws: WebSocket, session: LiveSession, codec: OpusCodec | PcmCodec) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data and data[0] == AUDIO:
            session.push(codec.decode(data[1:]))


async def _send(ws: WebSocket, session: LiveSession, codec: OpusCodec | PcmCodec) -> None:
    while True:
        frame = await session.next_frame()
        if frame.audio is not None:
            payload = codec.encode(frame.audio)
            if payload:
                await ws.send_bytes(bytes([AUDIO]) + payload)
        if frame.text:
            await ws.send_bytes(bytes([TEXT]) + frame.text.encode())


async def _converse(ws: WebSocket, session: LiveSession, codec: OpusCodec | PcmCodec) -> None:
    """Until the caller hangs up."""
    tasks = [asyncio.create_task(_receive(ws, session, codec)), asyncio.create_task(_send(ws, session, codec))]
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


def create_chat_router(driver: LiveDriver, max_seconds: float) -> APIRouter:
    """The websocket, its stats and the browser client's files; `max_seconds` per conversation."""
    router = APIRouter(tags=["live"])

    @router.websocket("/api/chat")
    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        try:
            engine = await driver.engine()
            sampling, seed, codec_name = parse_session_args(ws.query_params, engine.sampling)
            session = await driver.open(sampling, seed)
        except LiveBusyError as exc:
            await _end(ws, f"busy: {exc} ({len(driver.sessions)} conversations in progress); "
                           "try again in a moment", 1013)
            return
        except MoshiError as exc:
            await _end(ws, f"error: {exc}", 1008 if isinstance(exc, InvalidParameterError) else 1011)
            return
        codec = PcmCodec() if codec_name == "pcm" else OpusCodec()
        try:
            await ws.send_bytes(HANDSHAKE)
            async with asyncio.timeout(max_seconds):
                await _converse(ws, session, codec)
        except TimeoutError:
            await driver.close(session)  # the slot is free by the time the caller hears of the end
            await _end(ws, f"time limit: conversations end after {max_seconds:g} s", 1000)
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

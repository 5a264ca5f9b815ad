"""Attacks on `/api/chat`: a caller who freezes another's conversation, holds the slots
without speaking, or floods the server with audio. Each one worked before issue 15.

The engine is tested directly (a failing slot is isolated), then the websocket is served for
real on loopback by uvicorn in a thread, with a short idle limit.
"""

import asyncio

import numpy as np
import pytest
import websockets
from fastapi import FastAPI
from live_client import last_message_before_close
from servers import serving_in_thread

from api.chat import MAX_MESSAGE_BYTES, create_chat_router
from api.live_driver import LiveDriver
from moshi_core.engines.live import LiveEngine

STEPS = 10
# The engine alone: the first step primes, the failing one ends, and two more show it never comes back.
ENGINE_STEPS = 4
IDLE_SECONDS = 2.0
HANDSHAKE = b"\x00" + bytes(8)
SILENCE = np.zeros(1920, np.float32)


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


def frames_of(outputs: list[dict], slot: int) -> int:
    return sum(slot in out and out[slot].audio is not None for out in outputs)


def test_a_seed_the_engine_cannot_take_ends_that_conversation_only(models):
    engine = LiveEngine(models, slots=2)
    good, bad = engine.open(seed=1), engine.open(seed=2**64)  # torch generators take < 2**64
    outputs = [engine.step({good: SILENCE, bad: SILENCE}) for _ in range(ENGINE_STEPS)]
    assert "cannot start the conversation" in outputs[0][bad].error
    assert all(bad not in out for out in outputs[1:])  # ended: never stepped again
    assert frames_of(outputs, good) == ENGINE_STEPS - 1  # the first frame only primes the model


def test_a_bad_frame_ends_that_conversation_only(models):
    engine = LiveEngine(models, slots=2)
    good, bad = engine.open(seed=1), engine.open(seed=2)
    outputs = [engine.step({good: SILENCE, bad: SILENCE})]
    outputs += [engine.step({good: SILENCE, bad: np.full(1920, np.nan, np.float32)})]
    outputs += [engine.step({good: SILENCE, bad: SILENCE}) for _ in range(ENGINE_STEPS - 2)]
    assert "NaN" in outputs[1][bad].error and all(bad not in out for out in outputs[2:])
    assert frames_of(outputs, good) == ENGINE_STEPS - 1


@pytest.fixture(scope="module")
def chat_url(models):
    app = FastAPI()
    driver = LiveDriver(lambda: LiveEngine(models, slots=2))
    app.include_router(create_chat_router(driver, max_seconds=60, idle_seconds=IDLE_SECONDS))
    with serving_in_thread(app) as address:
        yield f"ws://{address}/api/chat"


def pcm(samples: np.ndarray) -> bytes:
    return b"\x01" + (samples * 32767).astype("<i2").tobytes()


async def frames_back(ws, count: int) -> int:
    """Send `count` frames one at a time, as a microphone would; how many frames come back (20 s at most)."""
    received = 0
    try:
        async with asyncio.timeout(20):
            for _ in range(count):
                await ws.send(pcm(SILENCE))
                while (await ws.recv())[0] != 1:
                    pass
                received += 1
    except TimeoutError:
        pass
    return received


@pytest.mark.e2e
@pytest.mark.parametrize("query", ["seed=18446744073709551616", "seed=-1",
                                   "audio_topk=100000000000000000000"])
def test_an_out_of_range_argument_is_refused_and_never_freezes_another_conversation(chat_url, query):
    async def main():
        async with websockets.connect(chat_url + "?codec=pcm&seed=1") as talking:
            assert await talking.recv() == HANDSHAKE
            await talking.send(pcm(SILENCE))  # the first frame only primes the model
            assert await frames_back(talking, 2) == 2
            async with websockets.connect(f"{chat_url}?codec=pcm&{query}") as bad:
                try:
                    await bad.send(pcm(SILENCE))  # what froze the other conversation when accepted
                except websockets.ConnectionClosed:
                    pass
                refusal = await last_message_before_close(bad)
            return refusal, await frames_back(talking, STEPS)

    (message, code), answered = asyncio.run(main())
    assert message[0] == 5 and b"must be" in message and code == 1008, message
    assert answered == STEPS  # was 0 of 10 after a seed of 2**64


@pytest.mark.e2e
def test_callers_who_never_speak_do_not_hold_the_slots(chat_url):
    async def main():
        async with websockets.connect(chat_url + "?codec=pcm") as a, websockets.connect(chat_url + "?codec=pcm") as b:
            assert await a.recv() == HANDSHAKE and await b.recv() == HANDSHAKE
            ended = await asyncio.gather(last_message_before_close(a), last_message_before_close(b))
        async with websockets.connect(chat_url + "?codec=pcm") as later:
            return ended, await asyncio.wait_for(later.recv(), 10)

    ended, greeting = asyncio.run(main())
    assert ended == [(b"\x05idle: no audio for 2 s, the conversation ended", 1000)] * 2
    assert greeting == HANDSHAKE  # a slot was free again, not "busy"


@pytest.mark.e2e
def test_a_huge_message_is_refused(chat_url):
    async def main():
        async with websockets.connect(chat_url + "?codec=pcm", max_size=None) as ws:
            assert await ws.recv() == HANDSHAKE
            await ws.send(pcm(np.zeros(8_000_000, np.float32)))  # 16 MB: 5.5 min of audio in one message
            return await last_message_before_close(ws)

    message, code = asyncio.run(main())
    assert code == 1009 and message.decode() == (f"\x05a message of 16000001 bytes; the limit is {MAX_MESSAGE_BYTES} "
                                                 "(send audio as it is recorded, in pieces of at most 500 ms)")


@pytest.mark.e2e
def test_a_caller_who_sends_faster_than_real_time_is_dropped(chat_url):
    async def main():
        async with websockets.connect(chat_url + "?codec=pcm") as ws:
            assert await ws.recv() == HANDSHAKE
            try:
                for _ in range(100):  # 100 x 400 ms = 40 s of audio at once: was all kept in memory
                    await ws.send(pcm(np.zeros(9600, np.float32)))
            except websockets.ConnectionClosed:
                pass
            return await last_message_before_close(ws)

    message, code = asyncio.run(main())
    assert code == 1008 and message.startswith(b"\x05audio arrives faster than real time"), message

"""`/v1/realtime` served for real and spoken to with OpenAI's own client (`client.realtime.connect`).

Tiny random checkpoints (Moshi, and STT with the 1B's voice-activity heads): their words are
random, so the tests check the event flow, the timing (output while input still arrives),
the seed, admission shared with `/api/chat`, and the keys.
"""

import asyncio
import base64
import collections
import json
from collections.abc import Callable

import numpy as np
import openai
import pytest
import torch
import websockets
from fastapi import FastAPI
from oracle import write_stt_folder
from servers import serving_in_thread

from api.auth import install_auth
from api.chat import create_chat_router
from api.live_driver import LiveDriver
from api.realtime import create_realtime_router
from api.transcription_driver import TranscriptionDriver
from moshi_core.engines.live import LiveEngine
from moshi_core.engines.transcription import TranscriptionEngine
from moshi_core.formats.audio import load_audio
from moshi_core.inference.stt import load_stt
from workers.settings import Settings

pytestmark = pytest.mark.e2e  # real servers

SLOTS = 2
KEYS = ("key-a", "key-b")
FRAME = 1920
CHUNK = 2 * FRAME  # 160 ms of audio per append
COMPLETED = "conversation.item.input_audio_transcription.completed"


@pytest.fixture(scope="module")
def address(tiny_models, mimi_checkpoint, tokenizer_model, tmp_path_factory):
    stt_folder = tmp_path_factory.mktemp("stt")
    write_stt_folder(stt_folder, "stt-1b-en_fr", mimi_checkpoint, tokenizer_model)
    stt = load_stt(str(stt_folder), dtype=torch.float32)
    live, per_key = LiveDriver(lambda: LiveEngine(tiny_models, slots=SLOTS)), collections.Counter()
    app = FastAPI()
    app.include_router(create_chat_router(live, max_seconds=60, idle_seconds=10, max_per_key=SLOTS,
                                          open_per_key=per_key))
    app.include_router(create_realtime_router(live, TranscriptionDriver(lambda: TranscriptionEngine(stt, slots=1)),
                                              models={"moshi"}, max_seconds=60, idle_seconds=10, max_per_key=SLOTS,
                                              open_per_key=per_key))
    install_auth(app, Settings(api_keys=frozenset(KEYS)))
    with serving_in_thread(app) as address:
        yield address


@pytest.fixture(scope="module")
def speech(shared_audio) -> np.ndarray:
    wav = load_audio(shared_audio / "en_question_24k.wav")[0].numpy()
    return wav[: len(wav) // CHUNK * CHUNK]


def client(address: str, key: str = KEYS[0]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=f"http://{address}/v1", websocket_base_url=f"ws://{address}/v1")


def append(pcm: np.ndarray) -> dict:
    audio = base64.b64encode((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()).decode()
    return {"type": "input_audio_buffer.append", "audio": audio}


async def recv(conn, timeout: float = 20):
    return await asyncio.wait_for(conn.recv(), timeout)


async def until(conn, kind: str, timeout: float = 20):
    """The next event of `kind`, skipping the others."""
    while (event := await recv(conn, timeout)).type != kind:
        pass
    return event


async def talk(conn, pcm: np.ndarray, done: Callable[[list[str]], bool], pace: float = CHUNK / 24000,
               then: dict | None = None) -> list[tuple[int, object]]:
    """Append `pcm` a chunk at a time (then send `then`) while receiving, until `done(types of
    the events so far)`; returns each event with the number of chunks appended when it arrived."""
    appended, events = 0, []

    async def receive():
        while not done([e.type for _, e in events]):
            events.append((appended, await conn.recv()))

    receiver = asyncio.create_task(receive())
    for start in range(0, len(pcm), CHUNK):
        await conn.send(append(pcm[start : start + CHUNK]))
        appended += 1
        await asyncio.sleep(pace)
    if then is not None:
        await conn.send(then)
    await asyncio.wait_for(receiver, 30)
    return events


def answered(pcm: np.ndarray, kind: str = "response.output_audio.delta") -> Callable[[list[str]], bool]:
    """Moshi has answered every frame of `pcm` but the first, which only primes it."""
    return lambda types: types.count(kind) == len(pcm) // FRAME - 1


def test_conversation_streams_moshi_while_audio_comes_in_and_ignores_unknown_events(address, speech):
    chunks = 20

    async def main():
        async with client(address).realtime.connect(model="moshi") as conn:
            created = await recv(conn)
            assert created.type == "session.created" and created.session.model == "moshi"
            assert (await recv(conn)).type == "response.created"
            await conn.send({"type": "response.create"})
            refused = await until(conn, "error")
            assert refused.error.code == "unsupported_event" and refused.error.type == "invalid_request_error"
            return await talk(conn, speech[: 20 * CHUNK], answered(speech[: 20 * CHUNK]))

    events = asyncio.run(main())
    audio = [(n, e) for n, e in events if e.type == "response.output_audio.delta"]
    assert audio and audio[0][0] < chunks - 2  # Moshi spoke while the caller was still speaking
    assert len({e.response_id for _, e in audio}) == 1  # one long response
    samples = sum(len(base64.b64decode(e.delta)) // 2 for _, e in audio)
    assert samples == len(audio) * FRAME  # one 80 ms frame a delta
    assert any(e.type == "response.output_audio_transcript.delta" for _, e in events)
    assert not [e for _, e in events if e.type == "error"]


def test_session_update_sets_the_seed(address, speech):
    async def first_audio(seed: int, temperature: float = 1.0) -> list[str]:
        async with client(address).realtime.connect(model="moshi") as conn:
            await conn.send({"type": "session.update", "session": {"type": "realtime", "seed": seed,
                                                                   "text_temperature": temperature}})
            updated = await until(conn, "session.updated")
            assert updated.session.seed == seed and updated.session.text_temperature == temperature
            events = await talk(conn, speech[: 8 * CHUNK], answered(speech[: 8 * CHUNK]), pace=0)
            late = await until_error_after_audio(conn)
            assert late.error.param == "session"  # sampling is fixed once the audio has begun
            return [e.delta for _, e in events if e.type == "response.output_audio.delta"][:6]

    async def until_error_after_audio(conn):
        await conn.send({"type": "session.update", "session": {"type": "realtime", "seed": 1}})
        return await until(conn, "error")

    async def main():
        return [await first_audio(5), await first_audio(5), await first_audio(6)]

    same, again, other = asyncio.run(main())
    assert len(same) == 6 and same == again
    assert other != same


def test_a_caller_beyond_the_slots_of_both_doors_gets_an_error_event_and_a_clean_close(address):
    async def main():
        chat_url = f"ws://{address}/api/chat?codec=pcm"
        async with websockets.connect(chat_url, additional_headers={"Authorization": f"Bearer {KEYS[0]}"}) as chat, \
                client(address).realtime.connect(model="moshi") as first:
            assert await asyncio.wait_for(chat.recv(), 20) == b"\x00" + bytes(8)
            assert (await recv(first)).type == "session.created"
            async with client(address, KEYS[1]).realtime.connect(model="moshi") as extra:
                refused = await recv(extra)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await recv(extra)
            return refused, closed.value

    refused, closed = asyncio.run(main())
    assert refused.type == "error" and refused.error.code == "busy" and "slots" in refused.error.message
    assert closed.rcvd.code == 1013


@pytest.mark.parametrize("key", [None, "not-a-key"])
def test_a_missing_or_unknown_key_is_refused_as_on_api_chat(address, key):
    async def refusal(path: str):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"ws://{address}{path}", additional_headers=headers):
                pass
        return refused.value.response.status_code

    async def main():
        statuses = [await refusal("/v1/realtime?model=moshi"), await refusal("/api/chat")]
        if key is not None:  # and through OpenAI's client
            with pytest.raises(websockets.InvalidStatus):
                async with client(address, key).realtime.connect(model="moshi"):
                    pass
        return statuses

    assert asyncio.run(main()) == [403, 403]


def test_an_unknown_model_is_an_error_event(address):
    async def main():
        async with client(address).realtime.connect(model="gpt-realtime") as conn:
            refused = await recv(conn)
            with pytest.raises(websockets.ConnectionClosed):
                await recv(conn)
            return refused

    refused = asyncio.run(main())
    assert refused.error.code == "model_not_found" and refused.error.param == "model"


def test_transcription_session_streams_words_while_audio_is_appended(address, speech):
    chunks = len(speech) // CHUNK

    async def main():
        async with client(address).realtime.connect(extra_query={"intent": "transcription"}) as conn:
            created = await recv(conn)
            assert created.type == "session.created" and created.session.type == "transcription"
            assert created.session.audio.input.turn_detection.type == "server_vad"  # the model has VAD heads
            await conn.send({"type": "session.update", "session": {
                "type": "transcription", "audio": {"input": {"turn_detection": None}}}})
            updated = await until(conn, "session.updated")
            assert updated.session.audio.input.turn_detection is None
            await conn.send({"type": "conversation.item.create", "item": {}})
            assert (await until(conn, "error")).error.code == "unsupported_event"
            return await talk(conn, speech, lambda types: types[-1:] == [COMPLETED],
                              then={"type": "input_audio_buffer.commit"})

    events = asyncio.run(main())
    (committed,) = [e for _, e in events if e.type == "input_audio_buffer.committed"]
    completed = events[-1][1]
    deltas = [(n, e) for n, e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    assert deltas and deltas[0][0] < chunks - 2  # words came while audio was still being appended
    assert not [e for _, e in events if e.type.startswith("input_audio_buffer.speech")]  # no server VAD
    item = {e.item_id for _, e in deltas} | {committed.item_id, completed.item_id}
    assert len(item) == 1
    assert completed.transcript == "".join(e.delta for _, e in deltas)
    assert completed.usage.type == "duration" and completed.usage.seconds == pytest.approx(len(speech) / 24000)
    assert not [e for _, e in events if e.type == "error"]


def test_bad_audio_is_an_error_event_and_the_session_goes_on(address):
    async def main():
        async with client(address).realtime.connect(extra_query={"intent": "transcription"}) as conn:
            await until(conn, "session.created")
            await conn.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
            bad = await until(conn, "error")
            await conn.send_raw(json.dumps({"no": "type"}))
            malformed = await until(conn, "error")
            await conn.send({"type": "input_audio_buffer.clear"})
            cleared = await until(conn, "input_audio_buffer.cleared")
            return bad, malformed, cleared

    bad, malformed, cleared = asyncio.run(main())
    assert bad.error.param == "audio" and "base64" in bad.error.message
    assert malformed.error.code == "invalid_event"
    assert cleared.type == "input_audio_buffer.cleared"


def test_a_beta_client_is_answered_in_beta_names(address, speech):
    async def main():
        beta = client(address).beta.realtime
        async with beta.connect(model="moshi", extra_query={"intent": "transcription"}) as conn:
            await until(conn, "session.created")
            await conn.send({"type": "transcription_session.update", "session": {"turn_detection": None}})
            updated = await until(conn, "transcription_session.updated")
        async with beta.connect(model="moshi") as conn:
            await until(conn, "response.created")
            pcm = speech[: 4 * CHUNK]
            events = await talk(conn, pcm, answered(pcm, "response.audio.delta"), pace=0)
        return updated, {e.type for _, e in events}

    updated, kinds = asyncio.run(main())
    assert updated.to_dict()["session"]["audio"]["input"]["turn_detection"] is None
    assert {"response.audio.delta", "response.audio_transcript.delta"} <= kinds
    assert not {k for k in kinds if k.startswith("response.output_audio")}

"""`/api/chat` served for real: Kyutai's protocol, concurrency and the time limit."""

import asyncio
import json
import time
import urllib.request

import numpy as np
import pytest
import sphn
import websockets
from app_server import serve_app

from moshi_core.formats.audio import load_audio

pytestmark = pytest.mark.e2e  # real servers

SLOTS = 2
MAX_SECONDS = 3  # in an app of its own: the other tests' conversations take longer on a busy machine
FRAMES = 20  # 1.6 s of the user's speech per conversation
HANDSHAKE = b"\x00" + bytes(8)


@pytest.fixture(scope="module")
def app_url(mimi_checkpoint, tiny_moshi):
    with serve_app(mimi_checkpoint, tiny_moshi, MOSHI_LIVE_SLOTS=str(SLOTS)) as url:
        yield url


@pytest.fixture(scope="module")
def speech(shared_audio) -> np.ndarray:
    wav = load_audio(shared_audio / "en_question_24k.wav")[0].numpy()
    return wav[: wav.shape[0] // 1920 * 1920].reshape(-1, 1920)


def ws_url(app_url: str, **query) -> str:
    return app_url.replace("http", "ws") + "/api/chat?" + "&".join(f"{k}={v}" for k, v in query.items())


def stats(app_url: str) -> dict:
    with urllib.request.urlopen(app_url + "/api/chat/stats", timeout=10) as response:
        return json.load(response)


def pcm_message(frame: np.ndarray) -> bytes:
    return b"\x01" + (frame * 32767).astype("<i2").tobytes()


async def talk_pcm(ws, frames: np.ndarray) -> tuple[list[np.ndarray], str]:
    """Our PCM variant: send the frames, then silence until Moshi has answered each frame
    but the first (which only primes the model); returns its audio frames and its text."""
    for frame in frames:
        await ws.send(pcm_message(frame))
    audio, text = [], ""
    while len(audio) < len(frames):  # the text of a step follows its audio: one step more
        message = await asyncio.wait_for(ws.recv(), 20)
        if message[0] == 1:
            audio.append(np.frombuffer(message[1:], "<i2") / 32768)
            await ws.send(pcm_message(np.zeros(1920, np.float32)))
        elif message[0] == 2:
            text += message[1:].decode()
    return audio[: len(frames) - 1], text


def test_kyutai_client_way_opus_in_opus_and_text_out(app_url, speech):
    """As Kyutai's client does: Ogg/Opus pages of 1920-sample chunks made with sphn."""

    async def main():
        writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
        received, texts = [], []
        async with websockets.connect(ws_url(app_url, text_temperature=0.7, audio_topk=100, seed=3)) as ws:
            assert await ws.recv() == HANDSHAKE
            for frame in speech[:FRAMES]:
                page = writer.append_pcm(frame)
                if page:
                    await ws.send(b"\x01" + page)
            try:
                while True:
                    message = await asyncio.wait_for(ws.recv(), 1.5 if received else 20)
                    if message[0] == 1:
                        received.append(reader.append_bytes(message[1:]))
                    elif message[0] == 2:
                        texts.append(message[1:].decode())
            except TimeoutError:
                pass  # Moshi has answered everything it was sent
        return np.concatenate(received), texts

    pcm, texts = asyncio.run(main())
    ended = stats(app_url)["ended"][-1]
    # Opus holds back a little audio at both ends; whole frames are what the server counts.
    assert FRAMES - 2 <= ended["frames_in"] <= FRAMES
    assert ended["frames_out"] == ended["frames_in"] - 1  # the first frame only primes the model
    assert ended["underruns"] == 0
    assert ended["frames_out"] * 1920 - 3 * 960 <= len(pcm) <= ended["frames_out"] * 1920
    assert np.abs(pcm).max() > 1e-3
    assert texts and ended["text_pieces"] == len(texts)


def test_one_more_caller_than_slots_is_told_busy_and_slots_stay_apart(app_url, speech):
    inputs = [speech[:FRAMES], speech[FRAMES : 2 * FRAMES]]
    query = [dict(codec="pcm", seed=11, text_temperature=1.0), dict(codec="pcm", seed=12, audio_temperature=0.5)]

    async def together():
        async with websockets.connect(ws_url(app_url, **query[0])) as a, \
                websockets.connect(ws_url(app_url, **query[1])) as b:
            assert await a.recv() == HANDSHAKE and await b.recv() == HANDSHAKE
            async with websockets.connect(ws_url(app_url)) as extra:
                refusal = await asyncio.wait_for(extra.recv(), 10)
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(extra.recv(), 10)
                assert extra.close_code == 1013
            assert len(stats(app_url)["active"]) == SLOTS
            return refusal, await asyncio.gather(talk_pcm(a, inputs[0]), talk_pcm(b, inputs[1]))

    async def alone(i: int):
        async with websockets.connect(ws_url(app_url, **query[i])) as ws:
            assert await ws.recv() == HANDSHAKE
            return await talk_pcm(ws, inputs[i])

    refusal, both = asyncio.run(together())
    assert refusal[0] == 5
    assert refusal[1:].decode().startswith(f"busy: all {SLOTS} conversation slots are in use ({SLOTS} conversations")
    for i in range(2):
        audio, text = asyncio.run(alone(i))
        assert both[i][1] == text and text  # the same seed and input give the same conversation
        np.testing.assert_allclose(np.stack(both[i][0]), np.stack(audio), atol=3 / 32768)
    assert both[0][1] != both[1][1]


def test_time_limit_ends_the_conversation_cleanly(mimi_checkpoint, tiny_moshi, speech):
    async def main():
        async with websockets.connect(ws_url(app_url, codec="pcm")) as ws:
            assert await ws.recv() == HANDSHAKE  # the model is loaded, the clock runs
            start = time.monotonic()

            async def speak():
                for frame in speech:  # in real time, as a microphone would
                    await ws.send(pcm_message(frame))
                    await asyncio.sleep(0.08)

            speaker = asyncio.create_task(speak())
            last = None
            try:
                async for message in ws:
                    last = message
            finally:
                speaker.cancel()
            return last, time.monotonic() - start, ws.close_code

    with serve_app(mimi_checkpoint, tiny_moshi, MOSHI_LIVE_MAX_SECONDS=str(MAX_SECONDS)) as app_url:
        last, elapsed, code = asyncio.run(main())
        ended = stats(app_url)["ended"][-1]
    assert last == b"\x05" + f"time limit: conversations end after {MAX_SECONDS} s".encode()
    assert code == 1000 and MAX_SECONDS - 0.5 < elapsed < MAX_SECONDS + 2
    assert ended["frames_out"] > 0

"""A first run on a cold cache: the app downloads Moshi from the Hub (a local stand-in, sending
the weights slowly) and the terminal, the live page's socket and /readyz show how far it is."""

import asyncio
import json
import urllib.request

import pytest
import websockets
from app_server import AppProcess
from hub_stand_in import HubStandIn

pytestmark = pytest.mark.e2e  # a real app, a real (stand-in) Hub

WEIGHTS_RATE = 2_000_000  # bytes per second: the tiny LM's 14 MB take 7 s, long enough to watch


def readyz(url: str) -> dict:
    with urllib.request.urlopen(url + "/readyz", timeout=10) as response:
        return json.load(response)


async def until_handshake(url: str) -> tuple[list[dict], list[dict]]:
    """What the live page hears before the conversation starts, and /readyz meanwhile."""
    reports, ready = [], []
    async with websockets.connect(url.replace("http", "ws") + "/api/chat?codec=pcm&progress=1") as ws:
        async with asyncio.timeout(180):
            while (message := await ws.recv())[0] != 0:
                assert message[0] == 4, message[:200]
                reports.append(json.loads(message[1:]))
                if len(ready) < 3:
                    ready.append(await asyncio.to_thread(readyz, url))
    return reports, ready


def test_a_cold_start_shows_the_download_in_the_terminal_the_page_and_readyz(tmp_path, mimi_checkpoint, tiny_moshi):
    files = {p.name: p.resolve() for p in tiny_moshi.iterdir()}
    weights = files["model.safetensors"].stat().st_size
    with HubStandIn({"test/tiny-moshi": files}, slow={"model.safetensors": WEIGHTS_RATE}) as hub:
        app = AppProcess(mimi_checkpoint, tiny_moshi, MOSHI_MODEL="test/tiny-moshi", HF_ENDPOINT=hub.url,
                         HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", MOSHI_LIVE_SLOTS="1")
        try:
            app.wait_up()
            reports, ready = asyncio.run(until_handshake(app.url))
            after, terminal = readyz(app.url), app.output()
        finally:
            app.stop()
    downloading = [r for r in reports if r["loading"]["stage"] == "downloading"
                   and r["loading"]["file"] == "model.safetensors"]
    assert downloading, reports
    assert all(r["loading"]["model"] == "moshi" and r["loading"]["total"] == weights for r in downloading)
    assert downloading[0]["text"].startswith("moshi: downloading model.safetensors ")
    assert ready[0]["status"] == "ready" and ready[0]["loading"]["moshi"]["stage"] != "ready"
    assert after["loading"] == {}
    assert "moshi: downloading model.safetensors" in terminal and "moshi: ready (" in terminal
    assert "it/s]" not in terminal and "%|" not in terminal  # no tqdm bars

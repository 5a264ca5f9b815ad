"""The "Text to speech" tab served for real: audio pieces arrive while the rest is generated."""

import time

import pytest
from app_server import serve_app
from tts_oracle import VOICES, tiny_tts  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e  # real servers


def test_tts_tab_streams_audio_then_gives_the_words(mimi_checkpoint, tiny_moshi, tiny_tts):  # noqa: F811
    from gradio_client import Client

    folder, voices = tiny_tts
    with serve_app(mimi_checkpoint, tiny_moshi, MOSHI_TTS_MODEL=str(folder), MOSHI_TTS_VOICES=str(voices)) as url:
        client = Client(url, verbose=False)
        job = client.submit("hello how are you", VOICES[1], 4, api_name="/tts")
        arrivals = []
        for _ in job:  # one update per streamed piece
            arrivals.append(time.monotonic())
        outputs = job.outputs()
    pieces = [audio for audio, _ in outputs if audio]
    assert len(pieces) >= 3, outputs
    assert arrivals[-1] - arrivals[0] > 0.5  # the first piece came well before the last
    words = outputs[-1][1]
    assert [w["text"] for w in words] == ["hello", "how", "are", "you"]

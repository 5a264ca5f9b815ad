"""The web app served for real, driven through Gradio's own client."""

import time
import urllib.request

import pytest
from app_server import serve_app

from moshi_core.formats.tokens import load_tokens

pytestmark = pytest.mark.e2e  # a real server


@pytest.fixture(scope="module")
def app_url(mimi_checkpoint, tiny_moshi):
    with serve_app(mimi_checkpoint, tiny_moshi) as url:
        yield url


def test_page_is_served(app_url):
    with urllib.request.urlopen(app_url + "/", timeout=10) as response:
        assert response.status == 200
        assert "gradio" in response.read().decode().lower()


def test_encode_then_decode_through_the_ui_api(app_url, shared_audio):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    tokens_path = client.predict(handle_file(str(shared_audio / "en_question_24k.wav")), 4, api_name="/encode")
    tokens = load_tokens(tokens_path)
    assert tokens.num_codebooks == 4 and tokens.num_frames == 87
    audio_path = client.predict(handle_file(tokens_path), api_name="/decode")
    import soundfile as sf

    info = sf.info(audio_path)
    assert info.samplerate == 24000 and info.frames == tokens.num_samples[0]


def test_bad_token_file_gets_a_readable_error(app_url, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a token file" * 8)
    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="not a readable safetensors file"):
        client.predict(handle_file(str(bad)), api_name="/decode")


def test_dialogue_tab(app_url, shared_audio):
    import soundfile as sf
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    speech = handle_file(str(shared_audio / "en_short_16k.wav"))
    voice, both, text, words, seed = client.predict(speech, -1, False, 0.7, 0.8, False, api_name="/dialogue")
    n = round(sf.info(str(shared_audio / "en_short_16k.wav")).frames * 24000 / 16000)
    assert sf.info(voice).channels == 1 and sf.info(both).channels == 2
    assert abs(sf.info(voice).frames - n) <= 1
    assert isinstance(text, str) and isinstance(words, list)
    # The seed it drew is shown, and typed back in it gives the same answer.
    drawn = int(seed.removeprefix("seed: "))
    again, *_, seed_again = client.predict(speech, drawn, False, 0.7, 0.8, False, api_name="/dialogue")
    assert seed_again == seed
    assert (sf.read(again)[0] == sf.read(voice)[0]).all()


def test_rest_api_is_served_beside_the_ui_and_runs_jobs_in_process(app_url, shared_audio):
    """No REDIS_URL: `python app.py` (what `make run` starts) runs API jobs itself."""
    import httpx

    with httpx.Client(base_url=app_url, timeout=30) as client:
        assert client.get("/readyz").json()["queue"] == "in-process"
        speech = (shared_audio / "en_short_16k.wav").read_bytes()
        job = client.post("/v1/codec/encode", files={"file": ("short.wav", speech)}, data={"num_codebooks": "3"})
        assert job.status_code == 202, job.text
        url = job.headers["location"]
        deadline = time.monotonic() + 60
        while (state := client.get(url).json()["state"]) in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state == "succeeded"
        assert load_tokens(client.get(url + "/result").content).num_codebooks == 3
        assert client.get("/docs").status_code == 200

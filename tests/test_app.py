"""The web app served for real, driven through Gradio's own client."""

import urllib.request

import pytest

from app_server import serve_app
from moshi_core.tokens import load_tokens


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
    from gradio_client import Client, handle_file

    import soundfile as sf

    client = Client(app_url, verbose=False)
    voice, both, text, words = client.predict(
        handle_file(str(shared_audio / "en_short_16k.wav")), 1, 0.7, 0.8, False, api_name="/dialogue"
    )
    n = round(sf.info(str(shared_audio / "en_short_16k.wav")).frames * 24000 / 16000)
    assert sf.info(voice).channels == 1 and sf.info(both).channels == 2
    assert abs(sf.info(voice).frames - n) <= 1
    assert isinstance(text, str) and isinstance(words, list)

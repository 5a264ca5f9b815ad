"""The two Mimi tabs: audio -> token file (with a picture of the codes), token file -> audio."""

from pathlib import Path

import gradio as gr
import numpy as np
import torch

from moshi_core.formats.audio import load_audio, write_wav
from moshi_core.formats.tokens import load_tokens, save_tokens
from moshi_core.inference.codec import decode_tokens, encode_audio
from ui.common import PROGRESS, download_file, load_shown, out_path, progress_callback, shows_errors
from workers.models import ModelCache

TOKEN_FILE_LABEL = "Token file (safetensors)"


def codes_picture(codes: torch.Tensor, max_frames: int = 300) -> np.ndarray:
    """Codes [K, F] as an RGB picture: a hue per code value, 8 px per codebook, 4 px per frame
    (the first `max_frames` frames, 24 s)."""
    values = codes[:, :max_frames].numpy() / 2048.0
    # A cheap hue wheel: three phase-shifted cosines.
    rgb = 0.5 + 0.5 * np.cos(2 * np.pi * (values[..., None] + np.array([0.0, 1 / 3, 2 / 3])))
    return np.repeat(np.repeat((rgb * 255).astype(np.uint8), 8, axis=0), 4, axis=1)


def encode_tab(models: ModelCache) -> None:
    @shows_errors
    def encode(audio_path: str | None, num_codebooks: float, progress: gr.Progress = PROGRESS) -> str:
        if not audio_path:
            raise gr.Error("Upload or record some audio first.")
        wav = load_audio(audio_path, max_seconds=models.settings.max_audio_seconds)
        with load_shown(models, progress):
            mimi = models.mimi()
        tokens = encode_audio(mimi, wav, num_codebooks=int(num_codebooks),
                              progress=progress_callback(progress, "encoding"))
        out = out_path(Path(audio_path).stem + ".mimi", ".safetensors")
        save_tokens(out, tokens)
        return str(out)

    def show_codes(tokens_path: str | None) -> np.ndarray | None:
        return codes_picture(load_tokens(tokens_path).codes[0]) if tokens_path else None

    with gr.Tab("Audio → Mimi tokens"):
        audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech")
        codebooks = gr.Slider(1, 32, value=8, step=1, label="Codebooks (8 is what Moshi uses; 32 sounds best)")
        button = gr.Button("Encode", variant="primary")
        tokens_out = download_file(TOKEN_FILE_LABEL)
        codes_out = gr.Image(label="The codes: one row per codebook, one column per 80 ms frame", type="numpy")
        button.click(encode, [audio_in, codebooks], tokens_out, api_name="encode").then(
            show_codes, tokens_out, codes_out, api_name=False)


def decode_tab(models: ModelCache) -> None:
    @shows_errors
    def decode(tokens_path: str | None, progress: gr.Progress = PROGRESS) -> str:
        if not tokens_path:
            raise gr.Error("Upload a token file (.safetensors) first.")
        with load_shown(models, progress):
            mimi = models.mimi()
        wav = decode_tokens(mimi, tokens_path, progress=progress_callback(progress, "decoding"))
        out = out_path(Path(tokens_path).stem, ".wav")
        write_wav(out, torch.cat(wav, dim=-1))
        return str(out)

    with gr.Tab("Mimi tokens → audio"):
        tokens_in = gr.File(label=TOKEN_FILE_LABEL, file_types=[".safetensors"], type="filepath")
        button = gr.Button("Decode", variant="primary")
        audio_out = gr.Audio(label="Decoded speech (24 kHz)", type="filepath")
        button.click(decode, tokens_in, audio_out, api_name="decode")

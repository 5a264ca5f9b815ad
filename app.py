"""The web app: a Gradio UI on a FastAPI server (a Hugging Face Space runs this file).

    python app.py [--mimi SOURCE] [--device auto|cpu|cuda] [--host 127.0.0.1] [--port 7860]

Today it serves the Mimi codec jobs (audio -> token file -> audio). The live conversation
tab and the REST API mount on this same server as the Moshi LM and the job queue land.
Models load on first use, so the page comes up even before the weights are downloaded.
"""

import argparse
import os
import tempfile
import threading
from pathlib import Path

import gradio as gr
import torch
import uvicorn
from fastapi import FastAPI

from moshi_core.audio import load_audio, write_wav
from moshi_core.checkpoints import load_mimi
from moshi_core.cli import MODEL_SOURCE_HELP
from moshi_core.codec import decode_tokens, encode_audio, resolve_device
from moshi_core.errors import MoshiError
from moshi_core.hub import DEFAULT_MIMI_SOURCE
from moshi_core.mimi import MimiModel
from moshi_core.tokens import save_tokens

MAX_AUDIO_SECONDS = float(os.environ.get("MOSHI_MAX_AUDIO_SECONDS", 600))


class LazyMimi:
    """Loads Mimi once, on first use, from one thread at a time."""

    def __init__(self, source: str, device: str) -> None:
        self.source, self.device = source, device
        self._model: MimiModel | None = None
        self._lock = threading.Lock()

    def get(self) -> MimiModel:
        with self._lock:
            if self._model is None:
                self._model = load_mimi(self.source, device=resolve_device(self.device))
            return self._model


def _progress_callback(progress: gr.Progress, label: str):
    return lambda done, total: progress(done / max(total, 1), desc=f"{label} {done}/{total} frames")


def _out_path(stem: str, suffix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix="moshi-")) / f"{stem}{suffix}"


def build_ui(mimi: LazyMimi) -> gr.Blocks:
    def encode(audio_path: str | None, num_codebooks: float, progress=gr.Progress()) -> str:
        if not audio_path:
            raise gr.Error("Upload or record some audio first.")
        try:
            wav = load_audio(audio_path, max_seconds=MAX_AUDIO_SECONDS)
            tokens = encode_audio(mimi.get(), wav, num_codebooks=int(num_codebooks),
                                  progress=_progress_callback(progress, "encoding"))
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
        out = _out_path(Path(audio_path).stem + ".mimi", ".safetensors")
        save_tokens(out, tokens)
        return str(out)

    def decode(tokens_path: str | None, progress=gr.Progress()) -> str:
        if not tokens_path:
            raise gr.Error("Upload a token file (.safetensors) first.")
        try:
            wav = decode_tokens(mimi.get(), tokens_path, progress=_progress_callback(progress, "decoding"))
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
        out = _out_path(Path(tokens_path).stem, ".wav")
        write_wav(out, torch.cat(wav, dim=-1))
        return str(out)

    with gr.Blocks(title="Moshi serving stack") as ui:
        gr.Markdown(
            "# Mimi codec\n"
            "Kyutai's Mimi turns 24 kHz speech into 12.5 frames per second of discrete codes "
            "(up to 32 codebooks of 2048 entries) and back. Live conversation with Moshi arrives "
            "on this page with the language model."
        )
        with gr.Tab("Audio → Mimi tokens"):
            audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech")
            codebooks = gr.Slider(1, 32, value=8, step=1, label="Codebooks (8 is what Moshi uses; 32 sounds best)")
            encode_button = gr.Button("Encode", variant="primary")
            tokens_out = gr.File(label="Token file (safetensors)")
            encode_button.click(encode, [audio_in, codebooks], tokens_out, api_name="encode")
        with gr.Tab("Mimi tokens → audio"):
            tokens_in = gr.File(label="Token file (safetensors)", file_types=[".safetensors"], type="filepath")
            decode_button = gr.Button("Decode", variant="primary")
            audio_out = gr.Audio(label="Decoded speech (24 kHz)", type="filepath")
            decode_button.click(decode, tokens_in, audio_out, api_name="decode")
    return ui


def create_app(mimi_source: str = DEFAULT_MIMI_SOURCE, device: str = "auto") -> FastAPI:
    app = FastAPI(title="Moshi serving stack")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return gr.mount_gradio_app(app, build_ui(LazyMimi(mimi_source, device)), path="/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Moshi web app (Gradio UI on FastAPI).")
    parser.add_argument("--mimi", default=os.environ.get("MOSHI_MIMI", DEFAULT_MIMI_SOURCE), metavar="SOURCE",
                        help=f"Mimi weights: {MODEL_SOURCE_HELP} (env MOSHI_MIMI; default: %(default)s)")
    parser.add_argument("--device", default=os.environ.get("MOSHI_DEVICE", "auto"),
                        help="cpu, cuda, cuda:N or auto (env MOSHI_DEVICE; default: %(default)s)")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                        help="interface to listen on; 0.0.0.0 for all (env HOST; default: %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)),
                        help="port to listen on (env PORT; default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"Moshi app on http://{args.host}:{args.port} (Mimi from {args.mimi}; it loads on first use)")
    uvicorn.run(create_app(args.mimi, args.device), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

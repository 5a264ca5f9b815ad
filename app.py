"""The web app: a Gradio UI on a FastAPI server (a Hugging Face Space runs this file).

    python app.py [--model SOURCE] [--mimi SOURCE] [--device auto|cpu|cuda] [--dtype bfloat16]
                  [--host 127.0.0.1] [--port 7860]

One server: the web UI (live conversation, dialogue from a file, the Mimi codec), the
websocket `/api/chat` (Kyutai's protocol) and the REST job API under `/v1` (`/docs`). Without
REDIS_URL the API's jobs run in this process, on the models the UI uses. Models load on
first use, so the page comes up even before the weights are downloaded.
"""

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI

from api import create_api
from api.chat import create_chat_router
from api.live_driver import LiveDriver
from moshi_core.cli.main import MODEL_SOURCE_HELP
from moshi_core.engines.live import LiveEngine
from moshi_core.errors import MoshiError
from moshi_core.formats.audio import PcmStream, load_audio, write_wav
from moshi_core.formats.pcm import SAMPLE_RATE, float_to_pcm16
from moshi_core.formats.subtitles import FORMATS, format_transcript
from moshi_core.formats.tokens import load_tokens, save_tokens
from moshi_core.inference.codec import decode_tokens, encode_audio
from moshi_core.inference.stt import LiveTranscription, Transcriber
from moshi_core.inference.tts import TTSRequest, TTSSession
from moshi_core.loading.catalog import DEFAULT_LM_SOURCE, DEFAULT_VOICE
from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE
from moshi_core.loading.tts_info import describe_tts
from moshi_core.params import SamplingParams, TTSParams
from workers.models import ModelCache
from workers.settings import Settings

# The live tab is our own client (api/static/live.js, a <moshi-live> element) over /api/chat.
LIVE_CLIENT_HEAD = '<script src="/api/chat/static/live.js"></script>'

def _progress_callback(progress: gr.Progress, label: str):
    return lambda done, total: progress(done / max(total, 1), desc=f"{label} {done}/{total} frames")


def _out_path(stem: str, suffix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix="moshi-")) / f"{stem}{suffix}"


def codes_picture(codes: torch.Tensor, max_frames: int = 300) -> np.ndarray:
    """Codes [K, F] as an RGB picture: a hue per code value, 8 px per codebook, 4 px per frame
    (the first `max_frames` frames, 24 s)."""
    values = codes[:, :max_frames].numpy() / 2048.0
    # A cheap hue wheel: three phase-shifted cosines.
    rgb = 0.5 + 0.5 * np.cos(2 * np.pi * (values[..., None] + np.array([0.0, 1 / 3, 2 / 3])))
    return np.repeat(np.repeat((rgb * 255).astype(np.uint8), 8, axis=0), 4, axis=1)


def build_ui(models: ModelCache) -> gr.Blocks:
    settings = models.settings

    def dialogue(audio_path: str | None, seed: float | None, temp_text: float, temp_audio: float, greedy: bool,
                 progress=gr.Progress()):
        if not audio_path:
            raise gr.Error("Upload or record what the user says first.")
        try:
            wav = load_audio(audio_path, max_seconds=settings.max_audio_seconds)
            sampling = SamplingParams(temp_text=temp_text, temp=temp_audio, use_sampling=not greedy)
            fixed_seed = None if seed is None or seed < 0 else int(seed)
            # The engine the REST dialogue jobs of this process use: concurrent dialogues share steps.
            result = models.dialogue(settings.default_model).run(
                wav, sampling=sampling, seed=fixed_seed, progress=_progress_callback(progress, "dialogue"))
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
        voice, both = _out_path("moshi", ".wav"), _out_path("user-left-moshi-right", ".wav")
        write_wav(voice, result.audio)
        write_wav(both, result.stereo)
        return str(voice), str(both), result.text, result.transcript()["words"]

    def encode(audio_path: str | None, num_codebooks: float, progress=gr.Progress()) -> str:
        if not audio_path:
            raise gr.Error("Upload or record some audio first.")
        try:
            wav = load_audio(audio_path, max_seconds=settings.max_audio_seconds)
            tokens = encode_audio(models.mimi(), wav, num_codebooks=int(num_codebooks),
                                  progress=_progress_callback(progress, "encoding"))
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
        out = _out_path(Path(audio_path).stem + ".mimi", ".safetensors")
        save_tokens(out, tokens)
        return str(out)

    def show_codes(tokens_path: str | None) -> np.ndarray | None:
        return codes_picture(load_tokens(tokens_path).codes[0]) if tokens_path else None

    def decode(tokens_path: str | None, progress=gr.Progress()) -> str:
        if not tokens_path:
            raise gr.Error("Upload a token file (.safetensors) first.")
        try:
            wav = decode_tokens(models.mimi(), tokens_path, progress=_progress_callback(progress, "decoding"))
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
        out = _out_path(Path(tokens_path).stem, ".wav")
        write_wav(out, torch.cat(wav, dim=-1))
        return str(out)

    def transcribe_file(audio_path: str | None, fmt: str, progress=gr.Progress()):
        if not audio_path:
            raise gr.Error("Upload or record some speech first.")
        try:
            wav = load_audio(audio_path, max_seconds=settings.max_audio_seconds)
            (transcript,) = Transcriber(models.stt()).transcribe([wav], progress=_progress_callback(progress, "transcribing"))
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
        out = _out_path(Path(audio_path).stem, "." + FORMATS[fmt])
        out.write_text(format_transcript(transcript, fmt))
        return transcript.text, [w.to_dict() for w in transcript.words], str(out)

    def transcribe_live(chunk: tuple[int, np.ndarray] | None, live: tuple[LiveTranscription, PcmStream] | None):
        """A few hundred ms of microphone audio at a time; the transcript so far."""
        if chunk is None:
            return (live[0].text if live else ""), live
        rate, samples = chunk
        try:
            live = live or (LiveTranscription(Transcriber(models.stt())), PcmStream(rate))
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
        transcription, pcm = live
        transcription.feed(pcm(samples))
        return transcription.text, live

    def finish_live(live: tuple[LiveTranscription, PcmStream] | None):
        if live is None:
            return "", None
        live[0].finish()
        return live[0].text, None

    def voices_for_picker():
        try:
            names = describe_tts(settings.tts_model, settings.tts_voices).voices.names()
        except MoshiError as exc:
            gr.Warning(f"Could not list the voices: {exc}")
            names = [DEFAULT_VOICE]
        return gr.update(choices=names)

    def speak(text: str, voice: str, seed: float | None):
        """Audio as it is generated: 0.4 s pieces for the streaming player, then the timed words."""
        if not text or not text.strip():
            raise gr.Error("Type something to say first.")
        params = TTSParams(seed=None if seed is None or seed < 0 else int(seed))
        try:
            session = TTSSession(models.tts(), [TTSRequest(" ".join(text.split()), voice or None, params)])
            pending = []
            for chunk in session.stream():
                pending.append(chunk.pcm)
                if len(pending) == 5 or chunk.done:
                    pcm = torch.cat(pending).numpy()
                    pending = []
                    yield (SAMPLE_RATE, float_to_pcm16(pcm)), None
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
        yield None, [w.to_dict() for w in session.words(0)]

    with gr.Blocks(title="Moshi serving stack") as ui:
        gr.Markdown(
            "# Moshi\n"
            "Kyutai's full-duplex speech model and its Mimi codec: talk with Moshi live, "
            "let it answer a recording, or run the codec."
        )
        with gr.Tab("Live conversation"):
            gr.Markdown("Press *Start talking*, allow the microphone, and speak: Moshi listens and "
                        "answers at the same time. Headphones keep its voice out of your microphone.")
            gr.HTML("<moshi-live></moshi-live>", head=LIVE_CLIENT_HEAD, js_on_load=None)
        with gr.Tab("Dialogue from a file"):
            user_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="What the user says")
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: a new one each time)")
                temp_text = gr.Slider(0, 2, value=0.7, step=0.05, label="Text temperature")
                temp_audio = gr.Slider(0, 2, value=0.8, step=0.05, label="Audio temperature")
                greedy = gr.Checkbox(label="Greedy (no sampling)")
            talk = gr.Button("Let Moshi answer", variant="primary")
            voice_out = gr.Audio(label="Moshi", type="filepath")
            both_out = gr.Audio(label="Both sides (user left, Moshi right)", type="filepath")
            text_out = gr.Textbox(label="Moshi's text")
            words_out = gr.JSON(label="Words with timestamps (s)")
            talk.click(dialogue, [user_in, seed, temp_text, temp_audio, greedy],
                       [voice_out, both_out, text_out, words_out], api_name="dialogue")
        with gr.Tab("Transcribe"):
            gr.Markdown(f"Speech to text with `{settings.stt_model}`: a file, or your microphone live.")
            with gr.Row():
                with gr.Column():
                    stt_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech file")
                    stt_format = gr.Radio(["text", "srt", "vtt", "json"], value="srt", label="Download as")
                    stt_button = gr.Button("Transcribe", variant="primary")
                with gr.Column():
                    stt_text = gr.Textbox(label="Transcript", lines=4)
                    stt_words = gr.JSON(label="Words with timestamps (s)")
                    stt_file = gr.File(label="Transcript file")
            stt_button.click(transcribe_file, [stt_in, stt_format], [stt_text, stt_words, stt_file],
                             api_name="transcribe")
            gr.Markdown("**Live**: press record and speak; words appear as they are recognised, the "
                        "model's delay behind you (0.5 s for stt-1b-en_fr, 2.5 s for stt-2.6b-en).")
            mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy", label="Microphone")
            live_text = gr.Textbox(label="Live transcript", lines=4)
            live_state = gr.State(None)
            mic.stream(transcribe_live, [mic, live_state], [live_text, live_state], stream_every=0.25,
                       time_limit=settings.max_audio_seconds)
            mic.stop_recording(finish_live, live_state, [live_text, live_state])
        with gr.Tab("Text to speech") as tts_tab:
            gr.Markdown(f"Kyutai's `{settings.tts_model}` (English, French): playback starts while the rest is "
                        'being generated. `<break time="1s"/>` inserts a pause.')
            tts_text = gr.Textbox(label="Text", lines=4, max_length=4096)
            with gr.Row():
                tts_voice = gr.Dropdown([DEFAULT_VOICE], value=DEFAULT_VOICE, allow_custom_value=True, label="Voice")
                tts_seed = gr.Number(value=-1, precision=0, label="Seed (-1: a new one each time)")
            tts_button = gr.Button("Speak", variant="primary")
            tts_audio = gr.Audio(label="Speech", streaming=True, autoplay=True)
            tts_words = gr.JSON(label="Words with timestamps (s)")
            tts_tab.select(voices_for_picker, None, tts_voice)
            tts_button.click(speak, [tts_text, tts_voice, tts_seed], [tts_audio, tts_words], api_name="tts")
        with gr.Tab("Audio → Mimi tokens"):
            audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech")
            codebooks = gr.Slider(1, 32, value=8, step=1, label="Codebooks (8 is what Moshi uses; 32 sounds best)")
            encode_button = gr.Button("Encode", variant="primary")
            tokens_out = gr.File(label="Token file (safetensors)")
            codes_out = gr.Image(label="The codes: one row per codebook, one column per 80 ms frame", type="numpy")
            encode_button.click(encode, [audio_in, codebooks], tokens_out, api_name="encode").then(
                show_codes, tokens_out, codes_out, api_name=False)
        with gr.Tab("Mimi tokens → audio"):
            tokens_in = gr.File(label="Token file (safetensors)", file_types=[".safetensors"], type="filepath")
            decode_button = gr.Button("Decode", variant="primary")
            audio_out = gr.Audio(label="Decoded speech (24 kHz)", type="filepath")
            decode_button.click(decode, tokens_in, audio_out, api_name="decode")
    return ui


def create_app(settings: Settings | None = None, live_slots: int = 0, live_max_seconds: float = 300) -> FastAPI:
    """The whole server for `settings` (read from the environment when None).

    `live_slots`: concurrent live conversations (0: 4 on a GPU, 1 on the CPU, which is
    already short of real time with one); `live_max_seconds`: the length of one.
    """
    settings = settings or Settings.from_env()
    models = ModelCache(settings)  # one copy of each model for the UI, the live chat and in-process jobs
    app = create_api(settings, models)

    def live_engine() -> LiveEngine:
        moshi = models.moshi(settings.default_model)
        return LiveEngine(moshi, slots=live_slots or (4 if moshi.lm.device.type == "cuda" else 1))

    live = LiveDriver(live_engine)
    app.include_router(create_chat_router(live, max_seconds=live_max_seconds))
    return gr.mount_gradio_app(app, build_ui(models), path="/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Moshi web app (Gradio UI on FastAPI).")
    parser.add_argument("--model", default=os.environ.get("MOSHI_MODEL", DEFAULT_LM_SOURCE), metavar="SOURCE",
                        help=f"Moshi model for dialogue: {MODEL_SOURCE_HELP} (env MOSHI_MODEL; default: %(default)s)")
    parser.add_argument("--dtype", default=os.environ.get("MOSHI_DTYPE", "bfloat16"),
                        choices=["bfloat16", "float16", "float32"],
                        help="LM weights and compute (env MOSHI_DTYPE; default: %(default)s)")
    parser.add_argument("--mimi", default=os.environ.get("MOSHI_MIMI", DEFAULT_MIMI_SOURCE), metavar="SOURCE",
                        help=f"Mimi weights: {MODEL_SOURCE_HELP} (env MOSHI_MIMI; default: %(default)s)")
    parser.add_argument("--device", default=os.environ.get("MOSHI_DEVICE", "auto"),
                        help="cpu, cuda, cuda:N or auto (env MOSHI_DEVICE; default: %(default)s)")
    # A Hugging Face Space sets GRADIO_SERVER_NAME=0.0.0.0 and expects the app there.
    parser.add_argument("--host", default=os.environ.get("HOST", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")),
                        help="interface to listen on; 0.0.0.0 for all (env HOST or GRADIO_SERVER_NAME; "
                             "default: %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)),
                        help="port to listen on (env PORT; default: %(default)s)")
    parser.add_argument("--live-slots", type=int, default=int(os.environ.get("MOSHI_LIVE_SLOTS", 0)),
                        help="live conversations at once, stepped as one batch; 0: 4 on a GPU, 1 on the CPU "
                             "(env MOSHI_LIVE_SLOTS; default: %(default)s)")
    parser.add_argument("--live-max-seconds", type=float, default=float(os.environ.get("MOSHI_LIVE_MAX_SECONDS", 300)),
                        help="length limit of one live conversation (env MOSHI_LIVE_MAX_SECONDS; default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"Moshi app on http://{args.host}:{args.port} (Moshi from {args.model}, Mimi from {args.mimi}; "
          "models load on first use)")
    env = Settings.from_env()
    settings = dataclasses.replace(env, models=tuple(dict.fromkeys([args.model, *env.models[1:]])), mimi=args.mimi,
                                   device=args.device, dtype=args.dtype)
    app = create_app(settings, args.live_slots, args.live_max_seconds)
    # Open streams (a Gradio client, a websocket) must not keep a stopping server up forever.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()

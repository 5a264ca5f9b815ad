"""The whole server: the REST API, the live chat websocket and the Gradio page, on one model cache."""

import gradio as gr
from fastapi import FastAPI

from api import create_api
from api.chat import create_chat_router
from api.live_driver import LiveDriver
from moshi_core.engines.live import LiveEngine
from ui.codec import decode_tab, encode_tab
from ui.dialogue import dialogue_tab
from ui.live import live_tab
from ui.transcribe import transcribe_tab
from ui.tts import tts_tab
from workers.models import ModelCache
from workers.settings import Settings


def build_ui(models: ModelCache) -> gr.Blocks:
    with gr.Blocks(title="Moshi serving stack") as ui:
        gr.Markdown(
            "# Moshi\n"
            "Kyutai's full-duplex speech model, its speech-to-text and text-to-speech models and "
            "its Mimi codec: talk with Moshi live, let it answer a recording, transcribe, have a text "
            "read out, or run the codec."
        )
        live_tab()
        dialogue_tab(models)
        transcribe_tab(models)
        tts_tab(models)
        encode_tab(models)
        decode_tab(models)
    return ui


def create_app(settings: Settings) -> FastAPI:
    """The server for `settings`; `settings.live_slots` 0 means 4 on a GPU and 1 on the CPU (which
    is already short of real time with one)."""
    models = ModelCache(settings)  # one copy of each model for the UI, the live chat and in-process jobs
    app = create_api(settings, models)

    def live_engine() -> LiveEngine:
        moshi = models.moshi(settings.default_model)
        return LiveEngine(moshi, slots=settings.live_slots or (4 if moshi.lm.device.type == "cuda" else 1))

    app.include_router(create_chat_router(LiveDriver(live_engine), max_seconds=settings.live_max_seconds))
    return gr.mount_gradio_app(app, build_ui(models), path="/")

"""The whole server: the REST API, the live chat websocket and the Gradio page, on one model cache."""

import collections
import os
import tempfile

import gradio as gr
from fastapi import FastAPI
from starlette.middleware import Middleware

from api import create_api
from api.auth import install_auth
from api.chat import create_chat_router
from api.live_driver import LiveDriver
from api.realtime import create_realtime_router
from api.transcription_driver import TranscriptionDriver
from moshi_core.engines.live import LiveEngine
from moshi_core.engines.transcription import TranscriptionEngine
from moshi_core.loading.progress import FAILED, READY, LoadStatus
from ui.codec import decode_tab, encode_tab
from ui.dialogue import dialogue_tab
from ui.live import live_tab
from ui.transcribe import transcribe_tab
from ui.tts import tts_tab
from ui.uploads import UploadsOnly
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
        slots = settings.live_slots or (4 if moshi.lm.device.type == "cuda" else 1)
        return models.engine(models.moshi_name(settings.default_model), moshi, lambda: LiveEngine(moshi, slots=slots))

    def live_model_loading() -> LoadStatus | None:
        """The load of the live conversation's model, while it is under way."""
        status = models.progress.snapshot().get(models.moshi_name(settings.default_model))
        return status if status is not None and status.stage not in (READY, FAILED) else None

    def transcription_engine() -> TranscriptionEngine:
        stt = models.stt()
        slots = settings.live_slots or (4 if stt.lm.device.type == "cuda" else 1)
        return models.engine("stt", stt, lambda: TranscriptionEngine(stt, slots=slots))

    # One driver and one count per key for both doors to Moshi: /api/chat and /v1/realtime.
    live_driver, open_per_key = LiveDriver(live_engine), collections.Counter()
    app.include_router(create_chat_router(live_driver, max_seconds=settings.live_max_seconds,
                                          idle_seconds=settings.live_idle_seconds,
                                          max_per_key=settings.key_max_conversations, loading=live_model_loading,
                                          open_per_key=open_per_key))
    app.include_router(create_realtime_router(
        live_driver, TranscriptionDriver(transcription_engine), models={"moshi", settings.default_model},
        max_seconds=settings.live_max_seconds, idle_seconds=settings.live_idle_seconds,
        max_per_key=settings.key_max_conversations, open_per_key=open_per_key))
    install_auth(app, settings)
    # Uploads of this server only, in a folder of its own (Gradio's default, /tmp/gradio, is every
    # Gradio app's on the machine): the components read the variable when they are built.
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="moshi-gradio-"))
    models.start_preload()  # in the background: the page is served meanwhile
    return gr.mount_gradio_app(app, build_ui(models), path="/", allowed_paths=[],
                               blocked_paths=[str(settings.storage_dir)],
                               app_kwargs={"middleware": [Middleware(UploadsOnly)]})

"""The "Text to speech" tab: playback starts while the rest of the speech is generated."""

import gradio as gr
import torch

from moshi_core.errors import MoshiError
from moshi_core.formats.pcm import SAMPLE_RATE, float_to_pcm16
from moshi_core.inference.tts import TTSRequest, TTSSession
from moshi_core.loading.catalog import DEFAULT_VOICE
from moshi_core.loading.tts_info import describe_tts
from moshi_core.params import TTSParams
from ui.common import PROGRESS, load_shown, seed_field, seed_value, shows_errors
from workers.models import ModelCache

PIECES_PER_UPDATE = 5  # 0.4 s of audio per update of the streaming player


def tts_tab(models: ModelCache) -> None:
    settings = models.settings
    listed: list[str] = []  # the voices, once listed: the tab lists them on its first opening only

    def voices_for_picker():
        if not listed:
            try:
                listed[:] = describe_tts(settings.tts_model, settings.tts_voices).voices.names()
            except MoshiError as exc:  # the default voice still works: a warning, not an error
                gr.Warning(f"Could not list the voices: {exc}")
                return gr.update(choices=[DEFAULT_VOICE])
        return gr.update(choices=listed)

    @shows_errors
    def speak(text: str, voice: str, seed: float | None, progress: gr.Progress = PROGRESS):
        """Audio as it is generated, for the streaming player, then the timed words."""
        if not text or not text.strip():
            raise gr.Error("Type something to say first.")
        params = TTSParams(seed=seed_value(seed))
        with load_shown(models, progress):
            model = models.tts()
        session = TTSSession(model, [TTSRequest(" ".join(text.split()), voice or None, params)])
        pending = []
        for chunk in session.stream():
            pending.append(chunk.pcm)
            if len(pending) == PIECES_PER_UPDATE or chunk.done:
                yield (SAMPLE_RATE, float_to_pcm16(torch.cat(pending))), None
                pending = []
        yield None, [w.to_dict() for w in session.words(0)]

    with gr.Tab("Text to speech") as tab:
        gr.Markdown(f"Kyutai's `{settings.tts_model}` (English, French): playback starts while the rest is "
                    'being generated. `<break time="1s"/>` inserts a pause.')
        text = gr.Textbox(label="Text", lines=4, max_length=4096)
        with gr.Row():
            voice = gr.Dropdown([DEFAULT_VOICE], value=DEFAULT_VOICE, allow_custom_value=True, label="Voice")
            seed = seed_field()
        button = gr.Button("Speak", variant="primary")
        audio = gr.Audio(label="Speech", streaming=True, autoplay=True)
        words = gr.JSON(label="Words with timestamps (s)")
        tab.select(voices_for_picker, None, voice)
        button.click(speak, [text, voice, seed], [audio, words], api_name="tts")

"""The "Dialogue from a file" tab: Moshi answers a recording of the user's side."""

import gradio as gr

from moshi_core.formats.audio import load_audio, write_wav
from moshi_core.params import SamplingOverrides, SamplingParams
from ui.common import (PROGRESS, load_shown, out_path, progress_callback, seed_field, seed_shown, seed_value,
                       shows_errors)
from workers.models import ModelCache


def sampling_overrides(own_settings: bool, temp_text: float, temp_audio: float, greedy: bool) -> SamplingOverrides:
    """The form's sampling fields: with "the model's settings" ticked the sliders change nothing,
    so the served model's `lm_gen_config` decides (no model is loaded when the page is built,
    so the sliders cannot start at its values)."""
    if own_settings:
        return SamplingOverrides(greedy=greedy)
    return SamplingOverrides(temp_text=temp_text, temp_audio=temp_audio, greedy=greedy)


def dialogue_tab(models: ModelCache) -> None:
    settings = models.settings

    @shows_errors
    def dialogue(audio_path: str | None, seed: float | None, own_settings: bool, temp_text: float,
                 temp_audio: float, greedy: bool, progress: gr.Progress = PROGRESS):
        if not audio_path:
            raise gr.Error("Upload or record what the user says first.")
        overrides = sampling_overrides(own_settings, temp_text, temp_audio, greedy)
        wav = load_audio(audio_path, max_seconds=settings.max_audio_seconds)
        # The engine the REST dialogue jobs of this process use: concurrent dialogues share steps.
        with load_shown(models, progress):
            engine = models.dialogue(settings.default_model)
        sampling = overrides.resolve(models.moshi(settings.default_model).generation_defaults)
        result = engine.run(wav, sampling=sampling, seed=seed_value(seed),
                            progress=progress_callback(progress, "dialogue"))
        voice, both = out_path("moshi", ".wav"), out_path("user-left-moshi-right", ".wav")
        write_wav(voice, result.audio)
        write_wav(both, result.stereo)
        return str(voice), str(both), result.text, result.transcript()["words"], seed_shown(result.seed)

    kyutai = SamplingParams()
    with gr.Tab("Dialogue from a file"):
        user_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="What the user says")
        with gr.Row():
            seed = seed_field()
            own_settings = gr.Checkbox(value=True, label="The model's sampling settings (its lm_gen_config)")
            temp_text = gr.Slider(0, 2, value=kyutai.temp_text, step=0.05, interactive=False,
                                  label="Text temperature")
            temp_audio = gr.Slider(0, 2, value=kyutai.temp, step=0.05, interactive=False, label="Audio temperature")
            greedy = gr.Checkbox(label="Greedy (no sampling)")
        talk = gr.Button("Let Moshi answer", variant="primary")
        with gr.Row():
            voice_out = gr.Audio(label="Moshi", type="filepath", scale=4)
            # The seed it drew when the field said -1: typed back in, it gives this answer again.
            seed_out = gr.Markdown()
        both_out = gr.Audio(label="Both sides (user left, Moshi right)", type="filepath")
        text_out = gr.Textbox(label="Moshi's text")
        words_out = gr.JSON(label="Words with timestamps (s)")
        own_settings.change(lambda own: [gr.update(interactive=not own)] * 2, own_settings, [temp_text, temp_audio],
                            api_name=False)
        talk.click(dialogue, [user_in, seed, own_settings, temp_text, temp_audio, greedy],
                   [voice_out, both_out, text_out, words_out, seed_out], api_name="dialogue")

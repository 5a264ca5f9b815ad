"""The "Transcribe" tab: speech to text from a file, or from the microphone as it speaks."""

from pathlib import Path

import gradio as gr
import numpy as np

from moshi_core.formats.audio import PcmStream, load_audio
from moshi_core.formats.subtitles import FORMATS, format_transcript
from moshi_core.inference.stt import LiveTranscription, Transcriber
from ui.common import PROGRESS, download_file, load_shown, out_path, progress_callback, shows_errors
from workers.models import ModelCache

LiveState = tuple[LiveTranscription, PcmStream] | None


def transcribe_tab(models: ModelCache) -> None:
    settings = models.settings

    @shows_errors
    def transcribe_file(audio_path: str | None, fmt: str, progress: gr.Progress = PROGRESS):
        if not audio_path:
            raise gr.Error("Upload or record some speech first.")
        wav = load_audio(audio_path, max_seconds=settings.max_audio_seconds)
        with load_shown(models, progress):
            stt = models.stt()
        (transcript,) = Transcriber(stt).transcribe([wav], progress=progress_callback(progress, "transcribing"))
        out = out_path(Path(audio_path).stem, "." + FORMATS[fmt])
        out.write_text(format_transcript(transcript, fmt))
        return transcript.text, [w.to_dict() for w in transcript.words], str(out)

    @shows_errors
    def transcribe_live(chunk: tuple[int, np.ndarray] | None, live: LiveState):
        """A few hundred ms of microphone audio at a time; the transcript so far."""
        if chunk is None:
            return (live[0].text if live else ""), live
        rate, samples = chunk
        live = live or (LiveTranscription(Transcriber(models.stt())), PcmStream(rate))
        transcription, pcm = live
        transcription.feed(pcm(samples))
        return transcription.text, live

    def finish_live(live: LiveState):
        if live is None:
            return "", None
        live[0].finish()
        return live[0].text, None

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
                stt_file = download_file("Transcript file")
        stt_button.click(transcribe_file, [stt_in, stt_format], [stt_text, stt_words, stt_file], api_name="transcribe")
        gr.Markdown("**Live**: press record and speak; words appear as they are recognised, the "
                    "model's delay behind you (0.5 s for stt-1b-en_fr, 2.5 s for stt-2.6b-en).")
        mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy", label="Microphone")
        live_text = gr.Textbox(label="Live transcript", lines=4)
        live_state = gr.State(None)
        mic.stream(transcribe_live, [mic, live_state], [live_text, live_state], stream_every=0.25,
                   time_limit=settings.max_audio_seconds)
        mic.stop_recording(finish_live, live_state, [live_text, live_state])

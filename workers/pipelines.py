"""One function per job kind: a job's folder in, its artifacts out.

Each calls the same core pipeline as the CLI and the web app (`moshi_core.inference.codec`,
`moshi_core.inference.dialogue`); inputs were validated by the API before the job was queued, and
every artifact is written atomically, so a job that runs twice (redelivered after a
worker died) leaves one complete set of files.
"""

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from moshi_core.formats.audio import atomic_write_bytes, load_audio, write_wav
from moshi_core.formats.pcm import SAMPLE_RATE, pcm16_bytes
from moshi_core.formats.subtitles import FORMATS, format_transcript
from moshi_core.formats.text import Word
from moshi_core.formats.tokens import MimiTokens, load_tokens, save_tokens
from moshi_core.inference.codec import decode_tokens, encode_audio
from moshi_core.inference.stt import Transcriber
from moshi_core.inference.tts import TTSRequest, TTSSession
from moshi_core.params import SamplingOverrides, TTSParams

from .jobs import AUDIO_INPUT, TEXT_INPUT, TOKENS_INPUT, TTS_STREAM, WORDS_STREAM, Job, JobKind, public_name
from .models import ModelCache

Progress = Callable[[int, int], None]
Pipeline = Callable[[Job, Path, ModelCache, Progress], list[str]]


def encode(job: Job, folder: Path, models: ModelCache, progress: Progress) -> list[str]:
    wav = load_audio(folder / AUDIO_INPUT)
    tokens = encode_audio(models.mimi(), wav, num_codebooks=job.params["num_codebooks"], progress=progress)
    save_tokens(folder / "tokens.safetensors", tokens)
    return ["tokens.safetensors"]


def decode(job: Job, folder: Path, models: ModelCache, progress: Progress) -> list[str]:
    (wav,) = decode_tokens(models.mimi(), load_tokens(folder / TOKENS_INPUT), progress=progress)
    write_wav(folder / "audio.wav", wav)
    return ["audio.wav"]


def dialogue(job: Job, folder: Path, models: ModelCache, progress: Progress) -> list[str]:
    p = job.params
    moshi = models.moshi(p["model"])
    # The job's record holds the overrides' fields flat, beside model, seed and max_seconds.
    overrides = SamplingOverrides(**{f.name: p[f.name] for f in fields(SamplingOverrides)})
    sampling = overrides.resolve(moshi.generation_defaults)
    # Batched with the other dialogue jobs this process runs at the same time (same answer as alone).
    engine = models.dialogue(p["model"])
    result = engine.run(load_audio(folder / AUDIO_INPUT), sampling=sampling, seed=p["seed"], progress=progress)
    write_wav(folder / "audio.wav", result.audio)
    write_wav(folder / "stereo.wav", result.stereo)
    # batch_peak: the most dialogues (this one included) that shared this one's steps.
    transcript = {**result.transcript(), "model": public_name(moshi.source), "seed": result.seed,
                  "batch_peak": result.peak_batch}
    atomic_write_bytes(folder / "transcript.json", json.dumps(transcript, ensure_ascii=False, indent=1).encode())
    codes = MimiTokens(codes=result.tokens[1:], num_samples=[result.audio.shape[-1]], codec=moshi.mimi.checkpoint_id)
    save_tokens(folder / "tokens.safetensors", codes)
    return ["audio.wav", "stereo.wav", "transcript.json", "tokens.safetensors"]


def transcribe(job: Job, folder: Path, models: ModelCache, progress: Progress) -> list[str]:
    # Each word appended as it is recognised (a rerun starts afresh), for a reader to stream.
    with open(folder / WORDS_STREAM, "w", encoding="utf-8") as stream:
        def write_words(_: int, words: list[Word]) -> None:
            stream.writelines(json.dumps(w.to_dict(), ensure_ascii=False) + "\n" for w in words)
            stream.flush()

        (transcript,) = Transcriber(models.stt()).transcribe([load_audio(folder / AUDIO_INPUT)], progress=progress,
                                                             on_words=write_words)
    names = []
    for fmt, suffix in FORMATS.items():
        text = format_transcript(transcript, fmt, model=public_name(models.settings.stt_model))
        atomic_write_bytes(folder / f"transcript.{suffix}", text.encode())
        names.append(f"transcript.{suffix}")
    return names


def tts(job: Job, folder: Path, models: ModelCache, progress: Progress) -> list[str]:
    p = job.params
    text = (folder / TEXT_INPUT).read_text(encoding="utf-8")
    params = TTSParams(temp=p["temp"], cfg_coef=p["cfg_coef"], seed=p["seed"])
    session = TTSSession(models.tts(), [TTSRequest(text, p["voice"], params)])
    expected = 30 + 4 * len(text.split())  # steps, roughly: for progress only
    pieces = []
    # Appended frame by frame (a rerun starts it afresh), so a reader can stream it while it grows.
    with open(folder / TTS_STREAM, "wb") as stream:
        for chunk in session.stream(lambda step: progress(step, max(expected, step + 1))):
            pieces.append(chunk.pcm)
            stream.write(pcm16_bytes(chunk.pcm))
            stream.flush()
    audio = torch.cat(pieces)
    write_wav(folder / "audio.wav", audio[None])
    transcript = {"text": " ".join(text.split()), "words": [w.to_dict() for w in session.words(0)],
                  "duration": audio.shape[-1] / SAMPLE_RATE, "model": public_name(models.settings.tts_model),
                  "voice": p["voice"], "seed": p["seed"]}
    atomic_write_bytes(folder / "transcript.json", json.dumps(transcript, ensure_ascii=False, indent=1).encode())
    return ["audio.wav", "transcript.json"]


PIPELINES: dict[JobKind, Pipeline] = {
    JobKind.ENCODE: encode, JobKind.DECODE: decode, JobKind.DIALOGUE: dialogue, JobKind.TRANSCRIBE: transcribe,
    JobKind.TTS: tts,
}

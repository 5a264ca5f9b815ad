"""Text-to-speech: a job (`POST /v1/tts`), OpenAI's `POST /v1/audio/speech`, and the voices.

Both endpoints run a TTS job, so the API process never loads the model. The worker appends
the audio to the job folder's `audio.pcm` frame by frame; `/v1/audio/speech` streams that
file to the client while it grows, so the first audio leaves before the text is all said.
The text travels in the job folder (`input.txt`), never through the broker.
"""

import asyncio
import contextlib
import functools
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.audio_stream import FORMATS, StreamEncoder
from moshi_core.loading.catalog import DEFAULT_VOICE
from moshi_core.loading.tts_info import TTSInfo, describe_tts
from moshi_core.params import TTSParams
from workers.errors import UnknownModelError
from workers.jobs import TEXT_INPUT, TTS_STREAM, Job, JobKind, public_name

from .routes import ERRORS, Caller, IdempotencyKey, Service, accepted
from .schemas import OPENAI_TTS_MODELS, JobOut
from .service import JobService
from .tailing import tail, wait_for_output

router = APIRouter(responses=ERRORS, tags=["speech"])
MAX_JOB_CHARS = 50_000
MAX_OPENAI_CHARS = 4096  # OpenAI's own limit for `input`
DEFAULTS = TTSParams()  # Kyutai's, for requests that leave a setting out


class TTSIn(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_JOB_CHARS, description='What to say; <break time="1s"/> pauses')
    voice: str | None = Field(None, description=f"A voice of GET /v1/voices (default: {DEFAULT_VOICE})")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Fixes the sampling (default: random, reported)")
    temperature: float = Field(DEFAULTS.temp, ge=0, le=2, description="Sampling temperature (0: greedy)")
    cfg_coef: float = Field(DEFAULTS.cfg_coef, ge=1, le=4,
                            description="Guidance the model was distilled with: 1.0 to 4.0 by 0.5")


class SpeechIn(BaseModel):
    """OpenAI's `audio.speech.create` body."""

    model: str
    input: str = Field(min_length=1, max_length=MAX_OPENAI_CHARS)
    voice: str = Field(description="A voice of GET /v1/voices")
    response_format: Literal["wav", "pcm", "flac", "opus", "mp3", "aac"] = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Time-stretched, pitch kept (ffmpeg's atempo)")
    instructions: str | None = Field(None, description="Accepted and ignored: the voice file sets the style")
    stream_format: Literal["audio", "sse"] = "audio"


class VoicesOut(BaseModel):
    voices: list[str]
    default: str
    repo: str


@functools.lru_cache(maxsize=4)
def _info(model: str, voices: str) -> TTSInfo:
    return describe_tts(model, voices)


def _check_model(jobs: JobService, model: str | None) -> str:
    served = jobs.settings.tts_model
    if model not in (None, "", served, public_name(served), *OPENAI_TTS_MODELS):
        raise UnknownModelError(f"unknown model {model!r}: this server speaks with {public_name(served)!r}; pass that "
                                f"(or one of {', '.join(OPENAI_TTS_MODELS)}) as the model")
    return served


async def _tts_job(jobs: JobService, owner: str, text: str, voice: str | None, asked: TTSParams,
                   idempotency_key: str | None = None):
    s = jobs.settings
    text = " ".join(text.split())
    if not text:
        raise InvalidParameterError("the text is empty")
    _check_markup(text, s.max_audio_seconds)
    voice = voice or DEFAULT_VOICE
    # Refused now, not by the worker once the answer has started.
    info = await asyncio.to_thread(_info, s.tts_model, s.tts_voices)
    info.check_cfg(asked.cfg_coef)
    await asyncio.to_thread(info.voices.path, voice)
    params = {"model": s.tts_model, "voice": voice, "temp": asked.temp, "cfg_coef": asked.cfg_coef,
              "seed": secrets.randbelow(2**31) if asked.seed is None else asked.seed}
    fingerprint = dict(params, seed=asked.seed)  # a retry without a seed is the same request
    # In a thread: the quota count and the writes take file locks.
    return await asyncio.to_thread(jobs.submit, JobKind.TTS, owner, params, {TEXT_INPUT: text.encode()}, "speech",
                                   idempotency_key, fingerprint_params=fingerprint)


def _check_markup(text: str, max_seconds: float) -> None:
    """The `<break>` tags parsed as the worker will parse them, so a bad one is a 422 now
    rather than a failed job, and pauses that alone pass the audio limit are refused."""
    # Imported here: the pure-text script parser, kept out of the modules a queue-only API loads.
    from moshi_core.inference.tts_script import split_line

    pauses = sum(item for item in split_line(text) if isinstance(item, float))
    if pauses > max_seconds:
        raise InvalidParameterError(f"the breaks add up to {pauses:g} s of silence; the audio limit is "
                                    f"{max_seconds:g} s: shorten them")


@router.post("/v1/tts", status_code=202, response_model=JobOut,
             summary="Text -> speech as a job (artifacts: audio.wav, transcript.json with word times)")
async def submit_tts(jobs: Service, owner: Caller, response: Response, body: Annotated[TTSIn, Body()],
                     idempotency_key: IdempotencyKey = None) -> JobOut:
    asked = TTSParams(temp=body.temperature, cfg_coef=body.cfg_coef, seed=body.seed)
    submission = await _tts_job(jobs, owner, body.text, body.voice, asked, idempotency_key)
    return accepted(jobs, submission.job, response, submission.replayed)


@router.post("/v1/audio/speech", summary="OpenAI-compatible speech, streamed as it is generated",
             responses={200: {"content": {t: {} for t in FORMATS.values()}}})
async def openai_speech(jobs: Service, owner: Caller, body: Annotated[SpeechIn, Body()]):
    _check_model(jobs, body.model)
    if body.stream_format != "audio":
        raise InvalidParameterError("stream_format 'sse' is not offered: the audio itself is streamed")
    encoder = StreamEncoder(body.response_format, speed=body.speed)
    job = (await _tts_job(jobs, owner, body.input, body.voice, DEFAULTS)).job
    started = await wait_for_output(jobs, job.id, jobs.store.folder(job.id) / TTS_STREAM, "speech")
    if not isinstance(started, Job):
        return started  # failed before any audio: a proper error status
    return StreamingResponse(_stream(jobs, started, owner, encoder), media_type=encoder.media_type,
                             headers={"X-Job-Id": job.id})


async def _stream(jobs: JobService, job: Job, owner: str, encoder: StreamEncoder) -> AsyncIterator[bytes]:
    """The growing audio file, encoded, until the job ends; a client that leaves cancels it."""
    # The header leaves with the first audio: every yield is then inside `tail`, which cancels
    # the job of a client that has left.
    head, odd = encoder.start(), b""
    async with contextlib.aclosing(tail(jobs, job, owner, jobs.store.folder(job.id) / TTS_STREAM)) as pieces:
        async for data in pieces:
            data, odd = _whole_samples(odd + data)
            if data and (out := await asyncio.to_thread(encoder.add, data)):
                yield head + out
                head = b""
    yield head + await asyncio.to_thread(encoder.finish)


def _whole_samples(data: bytes) -> tuple[bytes, bytes]:
    """16-bit samples, and the odd byte the worker has not finished writing."""
    cut = len(data) // 2 * 2
    return data[:cut], data[cut:]


@router.get("/v1/voices", response_model=VoicesOut, summary="The voices /v1/tts and /v1/audio/speech take")
async def list_voices(jobs: Service) -> VoicesOut:
    s = jobs.settings
    info = await asyncio.to_thread(_info, s.tts_model, s.tts_voices)
    names = await asyncio.to_thread(info.voices.names)
    return VoicesOut(voices=names, default=DEFAULT_VOICE, repo=s.tts_voices)

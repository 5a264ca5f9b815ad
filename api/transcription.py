"""Transcription: a job (`POST /v1/transcriptions`) and OpenAI's `POST /v1/audio/transcriptions`.

The OpenAI-shaped endpoint is synchronous for short files: it queues the same job and waits
for it (so the API process never loads a model), then answers in the format asked for. With
`stream=true` it answers server-sent events instead, one `transcript.text.delta` per word as
the worker recognises it (the job appends them to `words.jsonl`), then `transcript.text.done`.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from moshi_core.formats.subtitles import segments
from moshi_core.formats.text import Word
from workers.errors import UnknownModelError, UploadTooLargeError
from workers.jobs import WORDS_STREAM, Job, JobKind, JobState, public_name

from .errors import NotOfferedError, job_problem, openai_body, render
from .routes import ERRORS, Caller, IdempotencyKey, Service, accepted, read_upload, upload_name
from .schemas import OPENAI_STT_MODELS, ErrorOut, JobOut
from .service import JobService
from .tailing import tail, wait_for_output

router = APIRouter(responses=ERRORS, tags=["transcription"])
ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


def _model(jobs: JobService, model: str | None) -> str:
    served = jobs.settings.stt_model
    if model not in (None, "", served, public_name(served), *OPENAI_STT_MODELS):
        raise UnknownModelError(f"unknown model {model!r}: this server transcribes with {public_name(served)!r}; "
                                f"pass that (or one of {', '.join(OPENAI_STT_MODELS)}) as the model")
    return served


@router.post("/v1/transcriptions", status_code=202, response_model=JobOut,
             summary="Speech file -> text with word timestamps (a job: JSON, SRT, WebVTT and text artifacts)")
def submit_transcription(
    jobs: Service, owner: Caller, response: Response,
    file: Annotated[UploadFile, File(description="Speech: wav, flac, ogg/opus or mp3; any rate")],
    model: Annotated[str | None, Form(description="The STT model of GET /v1/models (default: the server's)")] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    name = upload_name(file, "audio")
    data = read_upload(file, jobs.settings.max_upload_bytes)
    files, _ = jobs.audio_input(data, name)
    submission = jobs.submit(JobKind.TRANSCRIBE, owner, {"model": _model(jobs, model)}, files, name, idempotency_key,
                             upload=data)
    return accepted(jobs, submission.job, response, submission.replayed)


@router.post("/v1/audio/transcriptions", summary="OpenAI-compatible transcription (synchronous, short files)",
             responses={200: {"content": {"application/json": {}, "text/plain": {}, "text/event-stream": {}}}})
async def openai_transcription(
    jobs: Service, owner: Caller,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form(description="The server's STT model (GET /v1/models), or whisper-1, "
                               "gpt-4o-transcribe, gpt-4o-mini-transcribe for it")],
    response_format: Annotated[ResponseFormat, Form()] = "json",
    language: Annotated[str | None, Form(description="Accepted; the model finds the language itself")] = None,
    prompt: Annotated[str | None, Form(description="Accepted and ignored")] = None,
    temperature: Annotated[float, Form(ge=0, le=1, description="Accepted; decoding is greedy")] = 0.0,
    timestamp_granularities: Annotated[list[Literal["word", "segment"]] | None,
                                       Form(alias="timestamp_granularities[]")] = None,
    stream: Annotated[bool, Form(description="Server-sent events: a transcript.text.delta per word as it is "
                                 "recognised, then transcript.text.done")] = False,
):
    # Decoding takes seconds for some files: never on the event loop, which serves every other request.
    job = await asyncio.to_thread(_submit_short, jobs, owner, file, model)
    if stream:
        started = await wait_for_output(jobs, job.id, jobs.store.folder(job.id) / WORDS_STREAM, "transcription")
        if not isinstance(started, Job):
            return started  # failed before its first word: a proper error status
        return StreamingResponse(_events(jobs, started, owner), media_type="text/event-stream",
                                 headers={"X-Job-Id": job.id, "Cache-Control": "no-cache"})
    job = await jobs.wait(job.id, jobs.settings.sync_timeout_seconds)
    if job.state is not JobState.SUCCEEDED:
        return render(job_problem(job.error, "transcription"), openai=True)
    folder = jobs.store.folder(job.id)
    if response_format in ("text", "srt", "vtt"):
        suffix = {"text": "txt", "srt": "srt", "vtt": "vtt"}[response_format]
        return PlainTextResponse((folder / f"transcript.{suffix}").read_text())
    transcript = json.loads((folder / "transcript.json").read_text())
    if response_format == "json":
        return JSONResponse({"text": transcript["text"]})
    return JSONResponse(_verbose(transcript, language, timestamp_granularities or ["segment"]))


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


async def _events(jobs: JobService, job: Job, owner: str) -> AsyncIterator[bytes]:
    """OpenAI's transcription events: the deltas join into the text `transcript.text.done` carries."""
    pending, said = b"", 0
    async with contextlib.aclosing(tail(jobs, job, owner, jobs.store.folder(job.id) / WORDS_STREAM)) as pieces:
        async for data in pieces:
            *lines, pending = (pending + data).split(b"\n")  # whole lines only: the worker may be mid-line
            for line in lines:
                word = json.loads(line)["text"]
                yield _sse({"type": "transcript.text.delta", "delta": word if said == 0 else " " + word})
                said += 1
    done = jobs.store.get(job.id)
    if done.state is not JobState.SUCCEEDED:  # OpenAI's clients raise an error event's message
        yield _sse(openai_body(job_problem(done.error, "transcription")))
        return
    transcript = json.loads((jobs.store.folder(job.id) / "transcript.json").read_text())
    yield _sse({"type": "transcript.text.done", "text": transcript["text"]})


def _submit_short(jobs: JobService, owner: str, file: UploadFile, model: str) -> Job:
    """The transcription job of a file short enough to answer at once."""
    name = upload_name(file, "audio")
    data = read_upload(file, jobs.settings.max_upload_bytes)
    served = _model(jobs, model)
    files, seconds = jobs.audio_input(data, name)
    if seconds > jobs.settings.sync_max_seconds:
        raise UploadTooLargeError(
            f"{name!r} is {seconds:.1f} s long; this endpoint answers at once for up to "
            f"{jobs.settings.sync_max_seconds:g} s: submit longer files as a job with POST /v1/transcriptions"
        )
    return jobs.submit(JobKind.TRANSCRIBE, owner, {"model": served}, files, name).job


def _verbose(transcript: dict, language: str | None, granularities: list[str]) -> dict:
    """OpenAI's `verbose_json`: words and/or segments with their times."""
    words = [Word(**w) for w in transcript["words"]]
    out = {"task": "transcribe", "language": language or "auto", "duration": transcript["duration"],
           "text": transcript["text"]}
    if "word" in granularities:
        out["words"] = [{"word": w.text, "start": w.start, "end": w.end} for w in words]
    if "segment" in granularities:
        out["segments"] = [
            {"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [], "temperature": 0.0,
             "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
            for i, s in enumerate(segments(words))
        ]
    return out



@router.post("/v1/audio/translations", summary="Not offered: Kyutai's STT transcribes, it does not translate",
             responses={404: {"model": ErrorOut}})
async def openai_translation():
    raise NotOfferedError("translation is not offered: Kyutai's STT transcribes English and French; use "
                          "/v1/audio/transcriptions")

"""The REST routes: thin, each one reads its input, calls the job service, shapes the answer."""

import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Request, Response, UploadFile
from fastapi.responses import FileResponse, PlainTextResponse

from moshi_core.params import SamplingOverrides
from workers.errors import UploadTooLargeError
from workers.jobs import Job, JobKind, owner_of, public_name

from .auth import authenticate
from .errors import error_response
from .metrics import render_metrics
from .schemas import OPENAI_STT_MODELS, OPENAI_TTS_MODELS, ErrorOut, JobOut, ModelOut, ModelsOut, content_type
from .service import JobService

ERRORS = {status: {"model": ErrorOut} for status in (401, 404, 408, 409, 413, 422, 429, 503)}
router = APIRouter(responses=ERRORS)


def service(request: Request) -> JobService:
    return request.app.state.jobs


def caller(request: Request) -> str:
    """The owner of the jobs this request may see: a digest of its API key ("" without keys).

    The key guard (api.auth) has checked the key already; without it, this checks it."""
    return owner_of(authenticate(request.scope, service(request).settings.api_keys))


Service = Annotated[JobService, Depends(service)]
Caller = Annotated[str, Depends(caller)]
IdempotencyKey = Annotated[str | None, Header(max_length=255, description="Retry safely: the same key and "
                                              "request give the same job")]


def read_upload(upload: UploadFile, limit: int) -> bytes:
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLargeError(f"{upload.filename!r} is over this server's upload limit of {limit / 2**20:g} MB")
    return data


def accepted(jobs: JobService, job: Job, response: Response, replayed: bool) -> JobOut:
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["Retry-After"] = "1"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job, jobs.sizes(job))


def upload_name(upload: UploadFile, default: str) -> str:
    # Only the base name, for the download names of the artifacts.
    return Path(upload.filename or default).name or default


@router.post("/v1/dialogue", status_code=202, response_model=JobOut, tags=["jobs"],
             summary="Moshi answers the user's side of a conversation from an audio file")
def submit_dialogue(
    jobs: Service, owner: Caller, response: Response,
    file: Annotated[UploadFile, File(description="The user's speech: wav, flac, ogg/opus or mp3; any rate")],
    model: Annotated[str | None, Form(description="A model of GET /v1/models (default: the first)")] = None,
    seed: Annotated[int | None, Form(ge=0, lt=2**63, description="Fixes the sampling (default: random, "
                                     "reported in the job)")] = None,
    temp_text: Annotated[float | None, Form(ge=0, le=10, description="Text temperature (model default 0.7)")] = None,
    top_k_text: Annotated[int | None, Form(ge=0, le=100_000)] = None,
    temp_audio: Annotated[float | None, Form(ge=0, le=10, description="Audio temperature (model default 0.8)")] = None,
    top_k_audio: Annotated[int | None, Form(ge=0, le=100_000)] = None,
    greedy: Annotated[bool, Form(description="Always take the most likely token")] = False,
    max_seconds: Annotated[float | None, Form(gt=0, le=86_400, allow_inf_nan=False,
                                                 description="Use only the first seconds of the file")] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    name = upload_name(file, "audio")
    data = read_upload(file, jobs.settings.max_upload_bytes)
    files, _ = jobs.audio_input(data, name, max_seconds)
    sampling = SamplingOverrides(temp_text=temp_text, top_k_text=top_k_text, temp_audio=temp_audio,
                                 top_k_audio=top_k_audio, greedy=greedy)
    params, asked = jobs.dialogue_params(model, seed, sampling, max_seconds)
    submission = jobs.submit(JobKind.DIALOGUE, owner, params, files, name, idempotency_key, fingerprint_params=asked,
                             upload=data)
    return accepted(jobs, submission.job, response, submission.replayed)


@router.post("/v1/codec/encode", status_code=202, response_model=JobOut, tags=["jobs"],
             summary="Audio file -> Mimi tokens (a token file to download)")
def submit_encode(
    jobs: Service, owner: Caller, response: Response,
    file: Annotated[UploadFile, File(description="Audio: wav, flac, ogg/opus or mp3; any rate and channels")],
    num_codebooks: Annotated[int, Form(ge=1, le=32, description="8 is what Moshi uses; 32 sounds best")] = 8,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    name = upload_name(file, "audio")
    data = read_upload(file, jobs.settings.max_upload_bytes)
    files, _ = jobs.audio_input(data, name)
    submission = jobs.submit(JobKind.ENCODE, owner, {"num_codebooks": num_codebooks}, files, name, idempotency_key,
                             upload=data)
    return accepted(jobs, submission.job, response, submission.replayed)


@router.post("/v1/codec/decode", status_code=202, response_model=JobOut, tags=["jobs"],
             summary="Mimi token file -> 24 kHz audio")
def submit_decode(
    jobs: Service, owner: Caller, response: Response,
    file: Annotated[UploadFile, File(description="A token file made by /v1/codec/encode or `moshi-core encode`")],
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    name = upload_name(file, "tokens")
    files = jobs.tokens_input(read_upload(file, jobs.settings.max_upload_bytes), name)
    submission = jobs.submit(JobKind.DECODE, owner, {}, files, name, idempotency_key)
    return accepted(jobs, submission.job, response, submission.replayed)


@router.get("/v1/jobs", response_model=list[JobOut], tags=["jobs"], summary="Your jobs, newest first")
def list_jobs(jobs: Service, owner: Caller, limit: int = 100) -> list[JobOut]:
    mine = sorted((j for j in jobs.store.all() if j.owner == owner), key=lambda j: j.created_at, reverse=True)
    return [JobOut.of(j, jobs.sizes(j)) for j in mine[: max(limit, 0)]]


@router.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], summary="State, progress, timings, errors")
def get_job(job_id: str, jobs: Service, owner: Caller) -> JobOut:
    job = jobs.store.get_for(job_id, owner)
    return JobOut.of(job, jobs.sizes(job))


def _download(job: Job, path: Path) -> FileResponse:
    stem = Path(job.input_name).stem or job.kind.value
    return FileResponse(path, media_type=content_type(path.name), filename=f"{stem}.{path.name}")


@router.get("/v1/jobs/{job_id}/result", tags=["jobs"], response_class=FileResponse,
            summary="The job's main file: Moshi's voice (dialogue), the token file (encode), the audio (decode)")
def get_result(job_id: str, jobs: Service, owner: Caller) -> FileResponse:
    return _download(*jobs.artifact_path(job_id, owner, None))


@router.get("/v1/jobs/{job_id}/artifacts/{name}", tags=["jobs"], response_class=FileResponse,
            summary="One named file of a finished job (audio.wav, stereo.wav, transcript.json, tokens.safetensors)")
def get_artifact(job_id: str, name: str, jobs: Service, owner: Caller) -> FileResponse:
    return _download(*jobs.artifact_path(job_id, owner, name))


@router.delete("/v1/jobs/{job_id}", tags=["jobs"], responses={200: {"model": JobOut}, 204: {}},
               summary="Cancel a queued or running job; delete a finished one and its files")
def delete_job(job_id: str, jobs: Service, owner: Caller) -> Response:
    job = jobs.cancel(job_id, owner)
    if job is None:
        return Response(status_code=204)
    return Response(JobOut.of(job, {}).model_dump_json(), media_type="application/json")


@router.get("/v1/models", response_model=ModelsOut, tags=["service"],
            summary="The models this server runs, and OpenAI's names for them (OpenAI's list shape)")
def list_models(jobs: Service) -> ModelsOut:
    s = jobs.settings

    def entries(source: str, kind: str, default: bool, kinds: list[JobKind],
                aliases: tuple[str, ...] = ()) -> list[ModelOut]:
        name = public_name(source)
        owner = name.split("/")[0] if "/" in name else "local"  # a local folder is shown by its name
        return [ModelOut(id=id_, owned_by=owner, kind=kind, default=default, jobs=kinds,
                         alias_of=None if id_ == name else name) for id_ in (name, *aliases)]

    return ModelsOut(data=[
        *(m for source in s.models for m in entries(source, "moshi", source == s.default_model, [JobKind.DIALOGUE])),
        *entries(s.mimi, "mimi", True, [JobKind.ENCODE, JobKind.DECODE]),
        *entries(s.stt_model, "stt", True, [JobKind.TRANSCRIBE], OPENAI_STT_MODELS),
        *entries(s.tts_model, "tts", True, [JobKind.TTS], OPENAI_TTS_MODELS),
    ])


# Both answer from the event loop: no request, however many, can make them wait for a pool thread.
@router.get("/healthz", tags=["service"], summary="The API process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["service"], summary="The queue and at least one worker answer (checked every few "
            "seconds)")
async def readyz(request: Request):
    jobs = service(request)
    ready = await jobs.readiness.get()
    if ready.error is not None:
        return error_response(503, "queue_unavailable", ready.error, {"Retry-After": "5"})
    if not ready.workers:
        return error_response(503, "no_workers", f"the queue ({jobs.queue.name}) answers but no worker does: "
                              "start one with `celery -A workers worker` (see docs/deployment.md)")
    return {"status": "ready", "queue": jobs.queue.name, "workers": ready.workers, "pid": os.getpid(),
            "checked_at": ready.checked_at, "loading": jobs.loading()}


@router.get("/metrics", response_class=PlainTextResponse, tags=["service"],
            summary="Prometheus metrics: jobs by state, durations, queue depth")
def metrics(jobs: Service) -> PlainTextResponse:
    return PlainTextResponse(render_metrics(jobs), media_type="text/plain; version=0.0.4")

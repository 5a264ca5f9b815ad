"""What the API answers, as pydantic models (they make the OpenAPI schema at /docs)."""

from pydantic import BaseModel, Field

from workers.jobs import CONTENT_TYPES, Job, JobKind, JobState, public_name


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_audio"])
    message: str = Field(examples=["could not decode 'a.wav' as audio: supported formats are wav, flac, ogg/opus, mp3"])


class ErrorOut(BaseModel):
    error: ErrorDetail


class ArtifactOut(BaseModel):
    name: str = Field(examples=["audio.wav"])
    url: str
    content_type: str
    bytes: int


class Timings(BaseModel):
    created_at: float = Field(description="Unix time the job was accepted")
    started_at: float | None = Field(description="Unix time a worker first started it")
    finished_at: float | None
    queued_seconds: float | None = Field(description="from accepted to started")
    run_seconds: float | None = Field(description="from started to finished")


class JobOut(BaseModel):
    id: str
    kind: JobKind
    state: JobState
    progress: float = Field(ge=0, le=1)
    loading: dict | None = Field(None, description="while a running job waits for its model to load: the model, "
                                 "its stage and, downloading, file, done/total bytes, rate (B/s), eta (s)")
    timings: Timings
    params: dict
    attempts: int = Field(description="how many times a worker started it (more than 1: a worker died)")
    error: ErrorDetail | None
    artifacts: list[ArtifactOut]
    url: str
    result_url: str

    @classmethod
    def of(cls, job: Job, sizes: dict[str, int]) -> "JobOut":
        base = f"/v1/jobs/{job.id}"
        started, finished = job.started_at, job.finished_at
        return cls(
            id=job.id, kind=job.kind, state=job.state, progress=job.progress, loading=job.loading,
            timings=Timings(
                created_at=job.created_at, started_at=started, finished_at=finished,
                queued_seconds=None if started is None else round(started - job.created_at, 3),
                run_seconds=None if started is None or finished is None else round(finished - started, 3),
            ),
            # A local model folder is shown by its name, never by the server's path.
            params={**job.params, **({"model": public_name(job.params["model"])} if job.params.get("model") else {})},
            attempts=job.attempts,
            error=ErrorDetail(**job.error) if job.error else None,
            artifacts=[
                ArtifactOut(name=name, url=f"{base}/artifacts/{name}", bytes=sizes.get(name, 0),
                            content_type=content_type(name))
                for name in job.artifacts
            ],
            url=base, result_url=f"{base}/result",
        )


def content_type(name: str) -> str:
    suffix = name[name.rfind("."):]
    return CONTENT_TYPES.get(suffix, "application/octet-stream")


# OpenAI's model names, accepted as names of the server's own model (OpenAI's clients send them).
OPENAI_TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
OPENAI_STT_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")


class ModelOut(BaseModel):
    """OpenAI's model object, with what this server does with the model."""

    id: str
    object: str = "model"
    created: int = Field(0, description="0: this server does not know when the model was made")
    owned_by: str = Field(examples=["kyutai"])
    kind: str = Field(examples=["moshi", "mimi", "stt", "tts"])
    default: bool
    jobs: list[JobKind]
    alias_of: str | None = Field(None, description="an OpenAI name for the model `alias_of`")


class ModelsOut(BaseModel):
    """OpenAI's model list."""

    object: str = "list"
    data: list[ModelOut]

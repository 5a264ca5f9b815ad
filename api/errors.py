"""The one place where errors become HTTP answers.

Every error answer is JSON with a message written for the person who sent the request: what
is wrong and what to do. Our own routes answer `{"error": {"code", "message"}}`; the
OpenAI-compatible ones (`/v1/audio/*`, `/v1/models`, `/v1/realtime`) answer OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so OpenAI's clients read them. Both take
their status from the one table below.
"""

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from moshi_core.errors import (
    AudioTooLargeError,
    AudioTooLongError,
    CheckpointError,
    InvalidAudioError,
    InvalidParameterError,
    InvalidTokenFileError,
    ModelSourceError,
    MoshiError,
)
from workers.errors import (
    IdempotencyConflictError,
    JobNotFoundError,
    JobNotReadyError,
    JobTimeoutError,
    QueueUnavailableError,
    QuotaExceededError,
    UnknownModelError,
    UploadTooLargeError,
)


class AuthenticationError(MoshiError):
    """No API key, or one this server does not know."""


class NotOfferedError(MoshiError):
    """An OpenAI endpoint or option this server does not offer (e.g. translation)."""


# Most specific first: AudioTooLongError is an InvalidAudioError.
STATUS = [
    (AuthenticationError, 401, "unauthorized"),
    (JobNotFoundError, 404, "not_found"),
    (UnknownModelError, 404, "model_not_found"),  # what OpenAI answers for a model it does not serve
    (NotOfferedError, 404, "not_offered"),
    (JobNotReadyError, 409, "not_ready"),
    (IdempotencyConflictError, 409, "idempotency_conflict"),
    (UploadTooLargeError, 413, "too_large"),
    (AudioTooLongError, 413, "audio_too_long"),
    (AudioTooLargeError, 413, "audio_too_large"),
    (InvalidAudioError, 422, "invalid_audio"),
    (InvalidTokenFileError, 422, "invalid_token_file"),
    (InvalidParameterError, 422, "invalid_parameter"),
    (QuotaExceededError, 429, "quota_exceeded"),
    (QueueUnavailableError, 503, "queue_unavailable"),
    (JobTimeoutError, 504, "timeout"),
    (ModelSourceError, 503, "model_unavailable"),
    (CheckpointError, 503, "model_unavailable"),
]


OPENAI_PATHS = ("/v1/audio/", "/v1/models", "/v1/realtime")
# OpenAI's `param`: the request field an error is about, where the error's class says it.
PARAMS = {"model_not_found": "model", "invalid_audio": "file", "audio_too_long": "file", "audio_too_large": "file",
          "too_large": "file"}


@dataclass(frozen=True)
class Problem:
    """An error, ready to be rendered in either shape."""

    status: int
    code: str
    message: str
    param: str | None = None
    headers: dict[str, str] | None = None


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, *,
                   path: str = "") -> JSONResponse:
    """The error answer; `path` (the request's) picks OpenAI's shape on the OpenAI routes."""
    return render(Problem(status, code, message, PARAMS.get(code), headers), openai=is_openai_path(path))


def openai_body(problem: Problem) -> dict:
    return {"error": {"message": problem.message, "type": openai_type(problem.status), "param": problem.param,
                      "code": problem.code}}


def render(problem: Problem, openai: bool) -> JSONResponse:
    body = openai_body(problem) if openai else {"error": {"code": problem.code, "message": problem.message}}
    return JSONResponse(body, status_code=problem.status, headers=problem.headers)


def status_of(exc: MoshiError) -> tuple[int, str]:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal"


def _snake(name: str) -> str:
    name = name.removesuffix("Error")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


# A failed job records its error's class as a code (workers.runner: ModelSourceError ->
# "model_source"); this maps it back to the table, so that a failure answered synchronously
# has the status the same error raised in the API process would have.
JOB_CODES = {_snake(cls.__name__): (status, code) for cls, status, code in STATUS}


def job_problem(error: dict[str, str] | None, what: str) -> Problem:
    """The answer for a synchronous request whose job failed (`error`: the job's) or was cancelled."""
    if error is None:
        return Problem(409, "cancelled", f"the {what} job was cancelled")
    status, code = JOB_CODES.get(error["code"], (422 if error["code"] != "internal" else 500, error["code"]))
    return Problem(status, code, error["message"], headers={"Retry-After": "5"} if status == 503 else None)


def problem_of(exc: Exception) -> Problem:
    """Any error the API answers: ours, a validation error or an HTTP one (a 404 route)."""
    if isinstance(exc, MoshiError):
        status, code = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status == 503:
            headers = {"Retry-After": "5"}
        if isinstance(exc, QuotaExceededError):
            headers = {"Retry-After": str(exc.retry_after)}
        return Problem(status, code, str(exc), PARAMS.get(code), headers)
    if isinstance(exc, RequestValidationError):
        return _validation_problem(exc)
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return Problem(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))
    return Problem(500, "internal", f"internal error ({type(exc).__name__})")


def openai_error_body(exc: Exception) -> dict:
    """OpenAI's error object for `exc`: `{"error": {"message", "type", "param", "code"}}`."""
    return openai_body(problem_of(exc))


def _answer(request: Request, exc: Exception) -> JSONResponse:
    return render(problem_of(exc), openai=is_openai_path(request.url.path))


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path", "form")]
    return ".".join(parts) or "request"


def _validation_problem(exc: RequestValidationError) -> Problem:
    problems, fields = [], []
    for err in exc.errors():
        given = err.get("input")
        shown = "" if given is None or isinstance(given, (dict, bytes)) else f" (got {str(given)[:60]!r})"
        fields.append(_field(tuple(err.get("loc", ()))))
        problems.append(f"{fields[-1]}: {err.get('msg', 'invalid')}{shown}")
    return Problem(422, "invalid_request", "; ".join(problems), fields[0] if fields else None)


def install_error_handlers(app: FastAPI) -> None:
    for cls in (MoshiError, RequestValidationError, HTTPException):
        app.add_exception_handler(cls, _answer)

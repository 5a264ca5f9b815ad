"""The one place where errors become HTTP answers.

Every error answer is JSON, `{"error": {"code": "...", "message": "..."}}`, with a message
written for the person who sent the request: what is wrong and what to do.
"""

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


# Most specific first: AudioTooLongError is an InvalidAudioError.
STATUS = [
    (AuthenticationError, 401, "unauthorized"),
    (JobNotFoundError, 404, "not_found"),
    (JobNotReadyError, 409, "not_ready"),
    (IdempotencyConflictError, 409, "idempotency_conflict"),
    (UploadTooLargeError, 413, "too_large"),
    (AudioTooLongError, 413, "audio_too_long"),
    (AudioTooLargeError, 413, "audio_too_large"),
    (InvalidAudioError, 422, "invalid_audio"),
    (InvalidTokenFileError, 422, "invalid_token_file"),
    (InvalidParameterError, 422, "invalid_parameter"),
    (UnknownModelError, 422, "unknown_model"),
    (QuotaExceededError, 429, "quota_exceeded"),
    (QueueUnavailableError, 503, "queue_unavailable"),
    (JobTimeoutError, 504, "timeout"),
    (ModelSourceError, 503, "model_unavailable"),
    (CheckpointError, 503, "model_unavailable"),
]


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def status_of(exc: MoshiError) -> tuple[int, str]:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal"


def _moshi_error(request: Request, exc: MoshiError) -> JSONResponse:
    status, code = status_of(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "5"}
    if isinstance(exc, QuotaExceededError):
        headers = {"Retry-After": str(exc.retry_after)}
    return error_response(status, code, str(exc), headers)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path", "form")]
    return ".".join(parts) or "request"


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for err in exc.errors():
        given = err.get("input")
        shown = "" if given is None or isinstance(given, (dict, bytes)) else f" (got {str(given)[:60]!r})"
        problems.append(f"{_field(tuple(err.get('loc', ())))}: {err.get('msg', 'invalid')}{shown}")
    return error_response(422, "invalid_request", "; ".join(problems))


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MoshiError, _moshi_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)

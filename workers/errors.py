"""Errors of the job machinery; `api/errors.py` maps them (and the core's) to HTTP codes."""

from moshi_core.errors import InvalidParameterError, MoshiError


class JobNotFoundError(MoshiError):
    """No such job for this caller (never made, someone else's, or expired)."""


class JobNotReadyError(MoshiError):
    """The job has no result yet, failed, or was cancelled."""


class JobCancelledError(MoshiError):
    """Raised inside a running job when a cancellation was asked for."""


class QueueUnavailableError(MoshiError):
    """The broker (Redis) cannot be reached: nothing can be queued now."""


class IdempotencyConflictError(MoshiError):
    """An Idempotency-Key reused for a different request."""


class UnknownModelError(MoshiError):
    """A job names a model this server does not serve."""


class UploadTooLargeError(MoshiError):
    """An upload over the size limit."""


class JobTimeoutError(MoshiError):
    """A synchronous request whose job did not finish in time (the job goes on), or did not
    start in time (the job is withdrawn)."""


class QuotaExceededError(MoshiError):
    """A submission over its API key's limit on unfinished jobs or stored bytes."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, for the Retry-After header


class SettingsError(InvalidParameterError):
    """A bad environment variable, found at start; its message is one line for stderr."""

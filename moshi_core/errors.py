"""Typed errors of the core.

Every error a user can cause (bad audio, a bad token file, an unknown model) is a
`MoshiError` whose message says what went wrong and what to do. The HTTP layer maps
these classes to status codes in one place; the CLI prints the message and exits 2.
"""


class MoshiError(Exception):
    """Base class of the errors the core raises on purpose."""


class InvalidAudioError(MoshiError):
    """The audio input is empty, unreadable, not audio, or over a limit."""


class AudioTooLongError(InvalidAudioError):
    """The audio is longer than the limit set for the job (a server answers 413)."""


class AudioTooLargeError(InvalidAudioError):
    """The audio holds more samples (rate x channels x duration) than a decode may make (413)."""


class InvalidTokenFileError(MoshiError):
    """A Mimi token file is malformed, of an unknown version, or out of range."""


class InvalidParameterError(MoshiError):
    """A parameter (number of codebooks, device, dtype, ...) is out of range."""


class CheckpointError(MoshiError):
    """A checkpoint file does not match the model: missing, extra or misshapen tensors."""


class ModelSourceError(MoshiError):
    """A model source (repo id, hf:// URI, local path) cannot be resolved or fetched."""


class LiveInputError(MoshiError):
    """A live caller sends more audio than can wait for the model (faster than real time)."""


class LiveBusyError(MoshiError):
    """Every live conversation slot is taken: the caller should try again later."""

"""The OpenAI Realtime API's events, as `/v1/realtime` sends and reads them (docs/realtime.md).

Names are the GA API's (`openai.types.realtime`); a client of the beta API (`openai.types.beta
.realtime`) is understood too, and answered in its own names where the two differ.
"""

import base64
import binascii
import itertools
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.pcm import SAMPLE_RATE, pcm16_bytes, pcm16_from_bytes

from .errors import Problem, openai_body

# Beta client event -> its GA name (the beta names that are the GA ones are not listed).
BETA_CLIENT_EVENTS = {"transcription_session.update": "session.update"}
# GA server event -> its beta name, for a client that spoke beta.
BETA_SERVER_EVENTS = {"response.output_audio.delta": "response.audio.delta",
                      "response.output_audio_transcript.delta": "response.audio_transcript.delta",
                      "response.output_audio.done": "response.audio.done",
                      "response.output_audio_transcript.done": "response.audio_transcript.done"}
PCM_FORMATS = ("pcm16", "audio/pcm")  # beta's name, GA's (with "rate")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class EventWriter:
    """Server events with their `event_id`s, in GA names or, once the client spoke beta, beta names."""

    def __init__(self) -> None:
        self._count = itertools.count(1)
        self.beta = False

    def event(self, kind: str, **fields: Any) -> dict:
        if self.beta:
            kind = BETA_SERVER_EVENTS.get(kind, kind)
        return {"type": kind, "event_id": f"event_{next(self._count)}", **fields}

    def error(self, code: str, message: str, param: str | None = None, client_event_id: str | None = None,
              status: int = 400) -> dict:
        """OpenAI's `error` event; `status` picks its `type` as for an HTTP answer (401, 429, 5xx)."""
        body = openai_body(Problem(status, code, message, param))["error"]
        return self.event("error", error={**body, "event_id": client_event_id})


def client_event_type(event: Mapping[str, Any]) -> str:
    kind = event.get("type")
    if not isinstance(kind, str):
        raise InvalidParameterError("every client event is a JSON object with a string `type`")
    return BETA_CLIENT_EVENTS.get(kind, kind)


def decode_audio(event: Mapping[str, Any]) -> np.ndarray:
    """`input_audio_buffer.append`'s `audio`: base64 PCM16 mono at 24 kHz, as float32 samples."""
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise InvalidParameterError("input_audio_buffer.append needs `audio`: base64 PCM16, mono, 24 kHz")
    try:
        data = base64.b64decode(audio, validate=True)
    except binascii.Error:
        raise InvalidParameterError("`audio` is not valid base64") from None
    if len(data) % 2:
        raise InvalidParameterError(f"`audio` holds {len(data)} bytes: PCM16 has two bytes a sample")
    return pcm16_from_bytes(data)


def encode_audio(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm16_bytes(pcm)).decode()


def check_input_format(session: Mapping[str, Any]) -> None:
    """A session.update may only keep the one input format served: PCM16 mono at 24 kHz."""
    audio_input = (session.get("audio") or {}).get("input") or {}
    candidates = [session.get("input_audio_format"), audio_input.get("format")]
    for given in candidates:
        if given is None:
            continue
        kind = given.get("type") if isinstance(given, Mapping) else given
        rate = given.get("rate", SAMPLE_RATE) if isinstance(given, Mapping) else SAMPLE_RATE
        if kind not in PCM_FORMATS or rate != SAMPLE_RATE:
            raise InvalidParameterError(f"input audio must be PCM16 at {SAMPLE_RATE} Hz (audio/pcm), not {given!r}")


def pcm_format() -> dict:
    return {"type": "audio/pcm", "rate": SAMPLE_RATE}

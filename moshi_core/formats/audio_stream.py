"""Audio encoders for output streamed as it is made (TTS): feed float PCM, get bytes to send.

- `pcm`: raw 16-bit little-endian mono samples;
- `wav`: a WAV header whose sizes say "unknown" (0xFFFFFFFF, what streaming servers send and
  players accept), then 16-bit samples;
- `opus`: Ogg/Opus pages as they fill (sphn, as the live chat uses);
- `flac`: FLAC needs the whole signal for its header here: all of it comes at `finish()`.
"""

import io
import struct

import numpy as np

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.pcm import SAMPLE_RATE, pcm16_from_bytes

FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm", "opus": "audio/ogg", "flac": "audio/flac"}
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_stream_header(sample_rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """A 44-byte PCM16 WAV header for a stream of unknown length."""
    byte_rate = sample_rate * channels * 2
    return (b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, byte_rate, channels * 2, 16)
            + b"data" + struct.pack("<I", UNKNOWN_SIZE))


class StreamEncoder:
    """`start()` bytes first, then `add(pcm16)` for each piece of 16-bit PCM, then `finish()`."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE) -> None:
        if fmt not in FORMATS:
            raise InvalidParameterError(f"unknown audio format {fmt!r}: one of {', '.join(FORMATS)}")
        self.fmt, self.sample_rate = fmt, sample_rate
        self._pending = np.zeros(0, np.float32)  # opus takes whole 20 ms frames
        self._all: list[bytes] = []  # flac
        self._opus = None
        if fmt == "opus":
            import sphn

            self._opus = sphn.OpusStreamWriter(sample_rate)

    @property
    def media_type(self) -> str:
        return FORMATS[self.fmt]

    def start(self) -> bytes:
        return wav_stream_header(self.sample_rate) if self.fmt == "wav" else b""

    def add(self, pcm16: bytes) -> bytes:
        if self.fmt in ("wav", "pcm"):
            return pcm16
        if self.fmt == "flac":
            self._all.append(pcm16)
            return b""
        samples = pcm16_from_bytes(pcm16)
        self._pending = np.concatenate([self._pending, samples])
        frame = self.sample_rate // 50
        out = []
        while self._pending.shape[0] >= frame:
            out.append(self._opus.append_pcm(self._pending[:frame]))
            self._pending = self._pending[frame:]
        return b"".join(out)

    def finish(self) -> bytes:
        if self.fmt == "opus" and self._pending.shape[0]:  # pad the last frame with silence
            frame = self.sample_rate // 50
            last = np.zeros(frame, np.float32)
            last[: self._pending.shape[0]] = self._pending
            self._pending = np.zeros(0, np.float32)
            return self._opus.append_pcm(last)
        if self.fmt == "flac":
            import soundfile as sf

            samples = np.frombuffer(b"".join(self._all), "<i2")
            buffer = io.BytesIO()
            sf.write(buffer, samples, self.sample_rate, format="FLAC", subtype="PCM_16")
            return buffer.getvalue()
        return b""

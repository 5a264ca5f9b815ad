"""Audio encoders for output streamed as it is made (TTS): feed 16-bit PCM, get bytes to send.

- `pcm`: raw 16-bit little-endian mono samples;
- `wav`: a WAV header whose sizes say "unknown" (0xFFFFFFFF, what streaming servers send and
  players accept), then 16-bit samples;
- `mp3`, `aac` (ADTS), `opus` (Ogg): PyAV's encoders writing to a sink that cannot seek, so
  each muxer writes as it goes;
- `flac`: PyAV's too, but whole at `finish()`: its header holds the total length, and some
  decoders (libsndfile, so soundfile) refuse a FLAC stream that leaves it unset.

A `speed` other than 1 time-stretches the samples first (`tempo.TempoFilter`: pitch kept).
"""

import io
import struct

import av
import numpy as np

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.pcm import SAMPLE_RATE
from moshi_core.formats.tempo import TempoFilter

FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "aac": "audio/aac", "opus": "audio/ogg",
           "flac": "audio/flac"}
# format -> (PyAV container, encoder, container options)
CODECS = {
    "mp3": ("mp3", "libmp3lame", {}),
    "aac": ("adts", "aac", {}),
    "opus": ("ogg", "libopus", {"page_duration": "20000"}),  # a page per 20 ms frame (µs), as a live stream
    "flac": ("flac", "flac", {}),
}
WHOLE = {"flac"}  # written to a seekable buffer, sent at the end
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_stream_header(sample_rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """A 44-byte PCM16 WAV header for a stream of unknown length."""
    byte_rate = sample_rate * channels * 2
    return (b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, byte_rate, channels * 2, 16)
            + b"data" + struct.pack("<I", UNKNOWN_SIZE))


class _Chunks:
    """A write-only file for PyAV: without `seek`, muxers never go back to patch a header."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


class _Compressed:
    """One PyAV encoder and muxer; its encoder regroups samples into the frames its codec takes."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        container, codec, options = CODECS[fmt]
        self.sink = io.BytesIO() if fmt in WHOLE else _Chunks()
        self.out = av.open(self.sink, "w", format=container, options=options)
        self.stream = self.out.add_stream(codec, rate=sample_rate, layout="mono")
        self.sample_rate, self.pts = sample_rate, 0

    def add(self, samples) -> bytes:  # int16 [T]
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = self.sample_rate, self.pts
        self.pts += samples.shape[0]
        self._mux(frame)
        return self._take()

    def finish(self) -> bytes:
        self._mux(None)  # flush the encoder
        self.out.close()  # the trailer (and, seekable, the header's final sizes)
        return self.sink.getvalue() if isinstance(self.sink, io.BytesIO) else self._take()

    def _take(self) -> bytes:
        return b"" if isinstance(self.sink, io.BytesIO) else self.sink.take()

    def _mux(self, frame) -> None:
        for packet in self.stream.encode(frame):
            self.out.mux(packet)


class StreamEncoder:
    """`start()` bytes first, then `add(pcm16)` for each piece of 16-bit PCM, then `finish()`."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE, speed: float = 1.0) -> None:
        if fmt not in FORMATS:
            raise InvalidParameterError(f"unknown audio format {fmt!r}: one of {', '.join(FORMATS)}")
        self.fmt, self.sample_rate = fmt, sample_rate
        self._tempo = TempoFilter(speed, sample_rate) if speed != 1.0 else None
        self._codec = _Compressed(fmt, sample_rate) if fmt in CODECS else None

    @property
    def media_type(self) -> str:
        return FORMATS[self.fmt]

    def start(self) -> bytes:
        return wav_stream_header(self.sample_rate) if self.fmt == "wav" else b""

    def add(self, pcm16: bytes) -> bytes:
        if self._tempo is not None:
            pcm16 = self._tempo.add(pcm16)
        return self._encode(pcm16)

    def finish(self) -> bytes:
        out = self._encode(self._tempo.finish()) if self._tempo is not None else b""
        return out + (self._codec.finish() if self._codec is not None else b"")

    def _encode(self, pcm16: bytes) -> bytes:
        if self._codec is None or not pcm16:
            return pcm16
        return self._codec.add(np.frombuffer(pcm16, "<i2"))

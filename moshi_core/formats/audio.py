"""Reading and writing audio: any common format in, float32 mono 24 kHz out; 16-bit WAV out."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import soundfile as sf
import soxr
import torch

from moshi_core.errors import AudioTooLargeError, AudioTooLongError, InvalidAudioError, InvalidParameterError
from moshi_core.formats.pcm import SAMPLE_RATE, float_to_pcm16, pcm16_to_float

SUPPORTED_FORMATS = "wav, flac, ogg/opus, mp3"

AudioSource = str | os.PathLike[str] | bytes

# libsndfile may open these, but FFmpeg reads them better: libsndfile 1.2.2 ignores the
# Opus pre-skip (audio comes out 6.5 ms late with its end cut off), and builds before
# 1.1 have no mp3, so mp3 always goes through the one decoder whatever the build.
_FFMPEG_FORMATS = frozenset({"MP3"})
_FFMPEG_SUBTYPES = frozenset({"OPUS"})

# Container durations are estimates for some formats (mp3 without a Xing header is
# guessed from the bitrate), so the cheap header check leaves this much slack; the
# exact check after decoding still applies the limit itself.
_HEADER_DURATION_SLACK = 1.02

# Decoding costs rate x channels x duration, not duration: a few seconds at 655 kHz on 8
# channels cost as much as an hour of speech. Each second of the duration limit buys this
# many samples (8 channels at 48 kHz), counted from the header before decoding and again
# while decoding, since a header can lie.
SAMPLES_PER_LIMIT_SECOND = 8 * 48_000
_BLOCK_FRAMES = 1 << 16  # libsndfile reads this many frames at a time, mixed down to mono at once


def load_audio(source: AudioSource, *, max_seconds: float | None = None, label: str | None = None) -> torch.Tensor:
    """Decode `source` (a path, or a file's content as bytes) to float32 mono 24 kHz, shape [1, T].

    `label` names the input in error messages (e.g. an uploaded file's name).
    Raises `InvalidAudioError` when the input is missing, empty, not audio, without samples,
    holds NaN/inf, or is longer than `max_seconds`; `AudioTooLargeError` when it holds more
    samples (rate x channels x duration) than `max_seconds` allows (`SAMPLES_PER_LIMIT_SECOND`).
    The input is mixed down to mono as it is decoded, so memory grows with its duration only.
    """
    if max_seconds is not None and not max_seconds > 0:
        raise InvalidParameterError(f"max_seconds must be positive, got {max_seconds}")
    name = label or _describe(source)
    if isinstance(source, bytes):
        if not source:
            raise InvalidAudioError(f"{name} is empty")
    else:
        _check_file(Path(source), name)

    _check_wav_header(source, name, max_seconds)
    decoded = _decode_soundfile(source, name, max_seconds)
    mono, rate = decoded if decoded is not None else _decode_pyav(source, name, max_seconds)

    if rate != SAMPLE_RATE and mono.shape[0]:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    if mono.shape[0] == 0:  # after resampling too: one sample at 96 kHz is none at 24 kHz
        raise InvalidAudioError(f"{name} contains no audio samples")
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).unsqueeze(0)


class PcmStream:
    """Raw PCM chunks as a browser or sound card gives them ([T] or [T, C], int16 or float, at
    `rate`) -> [1, T] float32 mono at 24 kHz; one resampler for the whole stream, so chunk
    edges leave no clicks."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32") if rate != SAMPLE_RATE else None

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        data = pcm16_to_float(samples) if samples.dtype == np.int16 else samples.astype(np.float32)
        mono = np.ascontiguousarray(data.mean(axis=1) if data.ndim == 2 else data, dtype=np.float32)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        return torch.from_numpy(np.ascontiguousarray(mono)).unsqueeze(0)


def pad_batch(wavs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Waveforms [1, T_i] -> one zero-padded batch [B, 1, max T_i] and the true lengths."""
    lengths = [w.shape[-1] for w in wavs]
    batch = torch.zeros(len(wavs), 1, max(lengths))
    for i, w in enumerate(wavs):
        batch[i, :, : w.shape[-1]] = w
    return batch, lengths


def duration_seconds(wav: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> float:
    """Length in seconds of a waveform whose last dimension is time."""
    return wav.shape[-1] / sample_rate


def wav_bytes(wav: torch.Tensor, sample_rate: int = SAMPLE_RATE, *, exact: bool = False) -> bytes:
    """Encode `wav` ([T], [1, T] or [C, T], float in [-1, 1]) as a 16-bit PCM WAV file in memory.

    `exact` writes 32-bit float samples instead, which read back bit for bit (and unclipped):
    for intermediate files, such as a job's decoded input.
    """
    buffer = io.BytesIO()
    _write_wav_to(buffer, wav, sample_rate, exact)
    return buffer.getvalue()


def write_wav(
    path: str | os.PathLike[str], wav: torch.Tensor, sample_rate: int = SAMPLE_RATE
) -> None:
    """Write `wav` as a 16-bit PCM WAV file at `path`, atomically (clipped to [-1, 1])."""
    atomic_write_bytes(path, wav_bytes(wav, sample_rate))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as a plain open() would; a
    # NamedTemporaryFile would leave the final file at 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _describe(source: AudioSource) -> str:
    return "the input data" if isinstance(source, bytes) else f"'{os.fspath(source)}'"


def _check_file(path: Path, name: str) -> None:
    if not path.exists():
        raise InvalidAudioError(f"audio file {name} does not exist")
    if not path.is_file():
        raise InvalidAudioError(f"audio file {name} is not a regular file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InvalidAudioError(f"cannot read audio file {name}: {e.strerror}") from e
    if size == 0:
        raise InvalidAudioError(f"audio file {name} is empty")


def _too_long(name: str, seconds: float, max_seconds: float) -> AudioTooLongError:
    return AudioTooLongError(f"{name} is {seconds:.1f} s long; the limit is {max_seconds:g} s")


class _Budget:
    """Counts the samples (frames x channels) a decode makes against what `max_seconds` allows."""

    def __init__(self, name: str, max_seconds: float | None) -> None:
        self.name = name
        self.max_seconds = max_seconds
        self.limit = None if max_seconds is None else max_seconds * SAMPLES_PER_LIMIT_SECOND

    def check(self, rate: int, channels: int, seconds: float, *, announced: bool = False) -> None:
        if self.limit is None or rate * channels * seconds <= self.limit:
            return
        what = "announces" if announced else "holds at least"
        raise AudioTooLargeError(
            f"{self.name} {what} {rate * channels * seconds / 1e6:,.1f} million samples ({rate} Hz x {channels} "
            f"channels x {seconds:.1f} s); the limit is {self.limit / 1e6:,.1f} million ({self.max_seconds:g} s "
            "of 8-channel 48 kHz audio): send it at a lower sample rate or with fewer channels"
        )


def _mono_block(block: np.ndarray, name: str) -> np.ndarray:
    """[frames, channels] float32 -> [frames] mono, refusing NaN/inf."""
    if not np.isfinite(block).all():
        raise InvalidAudioError(f"{name} contains NaN or infinite samples")
    return block.mean(axis=1, dtype=np.float32)


def _check_wav_header(source: AudioSource, name: str, max_seconds: float | None) -> None:
    """Refuse a WAV whose header announces more than the limit, or more than the file holds.

    libsndfile and FFmpeg both read such a file as the few samples it really has, so a
    3-hour header on a short file, or a transfer cut in half, would otherwise pass as a
    shorter clip.
    """
    if isinstance(source, bytes):
        head, size = source[:65536], len(source)
    else:
        with _open_binary(source, name) as f:
            head, size = f.read(65536), os.fstat(f.fileno()).st_size
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    byte_rate, offset = 0, 12
    while offset + 8 <= len(head):
        chunk, length = head[offset : offset + 4], int.from_bytes(head[offset + 4 : offset + 8], "little")
        body = offset + 8
        if chunk == b"fmt " and body + 12 <= len(head):
            byte_rate = int.from_bytes(head[body + 8 : body + 12], "little")
        elif chunk == b"data":
            # 0 and 0xFFFFFFFF are what streaming writers put when the length is not known yet.
            if byte_rate <= 0 or length in (0, 0xFFFFFFFF):
                return
            declared, present = length / byte_rate, max(size - body, 0) / byte_rate
            too_long = max_seconds is not None and declared > max_seconds * _HEADER_DURATION_SLACK
            if present + 0.1 >= declared:
                if too_long:
                    raise _too_long(name, declared, max_seconds)
            elif too_long:
                raise AudioTooLongError(
                    f"{name} announces {declared:.1f} s of audio in its header; the limit is {max_seconds:g} s"
                )
            else:
                raise InvalidAudioError(
                    f"{name} is truncated: its header announces {declared:.1f} s of audio but it holds "
                    f"{present:.2f} s (was the upload or copy cut short?)"
                )
            return
        offset = body + length + (length & 1)  # chunks are padded to an even size


def _open_binary(source: AudioSource, name: str) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    try:
        return open(source, "rb")
    except OSError as e:
        raise InvalidAudioError(f"cannot read audio file {name}: {e.strerror}") from e


def _decode_soundfile(
    source: AudioSource, name: str, max_seconds: float | None
) -> tuple[np.ndarray, int] | None:
    """Decode with libsndfile: float32 mono [frames] and the rate, or None to use FFmpeg."""
    budget = _Budget(name, max_seconds)
    with _open_binary(source, name) as f:
        try:
            with sf.SoundFile(f) as snd:
                if snd.format in _FFMPEG_FORMATS or snd.subtype in _FFMPEG_SUBTYPES:
                    return None
                rate, channels = snd.samplerate, snd.channels
                if max_seconds is not None and snd.frames / rate > max_seconds:
                    raise _too_long(name, snd.frames / rate, max_seconds)
                budget.check(rate, channels, snd.frames / rate, announced=True)
                blocks, total = [], 0
                for block in snd.blocks(_BLOCK_FRAMES, dtype="float32", always_2d=True):
                    total += block.shape[0]
                    budget.check(rate, channels, total / rate)
                    blocks.append(_mono_block(block, name))
                return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), rate
        except sf.SoundFileError:
            return None  # not a format libsndfile knows (or a build without it)


def _decode_pyav(
    source: AudioSource, name: str, max_seconds: float | None
) -> tuple[np.ndarray, int]:
    """Decode with FFmpeg; returns float32 mono [frames] and the rate."""
    # A file object rather than a path string, so FFmpeg never reads a name such as
    # "http://..." or "concat:..." as a protocol.
    with _open_binary(source, name) as f:
        try:
            return _decode_container(f, name, max_seconds)
        except (av.FFmpegError, ValueError) as e:  # ValueError: PyAV's own format complaints
            raise InvalidAudioError(
                f"could not decode {name} as audio: supported formats are {SUPPORTED_FORMATS}"
            ) from e


def _decode_container(
    f: BinaryIO, name: str, max_seconds: float | None
) -> tuple[np.ndarray, int]:
    budget = _Budget(name, max_seconds)
    with av.open(f, mode="r") as container:
        if not container.streams.audio:
            raise InvalidAudioError(
                f"could not decode {name} as audio: supported formats are {SUPPORTED_FORMATS} "
                "(FFmpeg found no audio stream in it)"
            )
        stream = container.streams.audio[0]
        if stream.codec_context is None:  # a header naming no codec FFmpeg knows
            raise InvalidAudioError(
                f"could not decode {name} as audio: supported formats are {SUPPORTED_FORMATS} "
                "(its audio stream has no known codec)"
            )
        header_seconds = _header_seconds(container, stream)
        if max_seconds is not None and header_seconds is not None:
            if header_seconds > max_seconds * _HEADER_DURATION_SLACK:
                raise _too_long(name, header_seconds, max_seconds)
            budget.check(stream.sample_rate, stream.channels, header_seconds, announced=True)

        resampler = av.AudioResampler(format="fltp")  # keeps rate and layout, makes float planar
        chunks: list[np.ndarray] = []
        rate = 0
        total = 0

        def add(out: av.AudioFrame) -> None:
            nonlocal rate, total
            rate = rate or out.sample_rate
            planar = out.to_ndarray()  # [channels, n]
            total += planar.shape[1]
            budget.check(rate, planar.shape[0], total / rate)
            chunks.append(_mono_block(planar.T, name))

        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                add(out)
            if max_seconds is not None and rate and total > max_seconds * rate:
                # No usable header duration: stop at the limit rather than decode it all.
                raise AudioTooLongError(
                    f"{name} is more than {max_seconds:g} s long; the limit is {max_seconds:g} s"
                )
        for out in resampler.resample(None):
            add(out)

    if not chunks:
        return np.zeros(0, dtype=np.float32), rate or SAMPLE_RATE
    mono = np.concatenate(chunks)
    if max_seconds is not None and mono.shape[0] > max_seconds * rate:
        raise _too_long(name, mono.shape[0] / rate, max_seconds)
    return mono, rate


def _header_seconds(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _write_wav_to(target: BinaryIO, wav: torch.Tensor, sample_rate: int, exact: bool = False) -> None:
    if sample_rate <= 0:
        raise InvalidParameterError(f"sample_rate must be positive, got {sample_rate}")
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise InvalidParameterError(
            f"audio to write must have shape [T] or [C, T], got {list(wav.shape)}"
        )
    data = wav.detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(data).all():
        raise InvalidAudioError("cannot write audio that contains NaN or infinite samples")
    if exact:
        sf.write(target, data.T, sample_rate, format="WAV", subtype="FLOAT")
        return
    sf.write(target, float_to_pcm16(data).T, sample_rate, format="WAV", subtype="PCM_16")

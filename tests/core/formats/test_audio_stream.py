"""The streamed speech encoders (`StreamEncoder`): every OpenAI format decodes back to the audio
fed in, bytes leave before the end (FLAC's at the end), and `speed` stretches time without
moving the pitch."""

import io

import av
import numpy as np
import pytest

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.audio_stream import FORMATS, WHOLE, StreamEncoder
from moshi_core.formats.tempo import tempo_stages

RATE = 24000
PIECE = 1920  # 80 ms: what a TTS step adds


def _sine(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")


def _encode(fmt: str, samples: np.ndarray, speed: float = 1.0) -> tuple[bytes, int]:
    """The whole stream, and how many of its bytes came out before `finish()`."""
    encoder = StreamEncoder(fmt, speed=speed)
    parts = [encoder.start()] + [encoder.add(samples[i : i + PIECE].tobytes()) for i in range(0, len(samples), PIECE)]
    early = sum(map(len, parts))
    return b"".join(parts) + encoder.finish(), early


def _decode(fmt: str, data: bytes) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, RATE
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().astype(np.float32).reshape(-1) for f in container.decode(stream)]
        rate = stream.rate
    audio = np.concatenate(frames)
    return (audio / 32768 if np.abs(audio).max() > 2 else audio), rate


def _pitch(audio: np.ndarray, rate: int) -> float:
    middle = audio[len(audio) // 4 : 3 * len(audio) // 4]
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    return float(np.argmax(spectrum) * rate / len(middle))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_streams_and_decodes_to_the_audio_fed_in(fmt):
    samples = _sine(2.0)
    data, early = _encode(fmt, samples)
    audio, rate = _decode(fmt, data)
    assert rate == (48000 if fmt == "opus" else RATE)  # Opus always decodes at 48 kHz
    # mp3 and aac add an encoder delay and pad the last frame (tens of ms).
    assert abs(len(audio) / rate - 2.0) < 0.1, len(audio) / rate
    assert abs(_pitch(audio, rate) - 220) < 2
    if fmt in WHOLE:  # FLAC's header holds the length: it all comes at the end
        assert early == 0
    else:
        assert early > len(data) / 2, (early, len(data))  # most bytes left before the end


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_scales_the_duration_and_keeps_the_pitch(speed):
    audio, rate = _decode("wav", _encode("wav", _sine(2.0), speed)[0])
    assert abs(len(audio) / rate - 2.0 / speed) < 0.03 + 0.01 / speed, len(audio) / rate
    assert abs(_pitch(audio, rate) - 220) < 4  # resampling would have moved it to 220 * speed


def test_speed_stages_stay_in_one_atempo_range_and_multiply_to_the_speed():
    for speed in (0.25, 0.3, 0.5, 1.7, 2.0, 3.0, 4.0):
        stages = tempo_stages(speed)
        assert all(0.5 <= s <= 2.0 for s in stages) and abs(np.prod(stages) - speed) < 1e-9
    with pytest.raises(InvalidParameterError, match="0.25 to 4"):
        tempo_stages(5.0)

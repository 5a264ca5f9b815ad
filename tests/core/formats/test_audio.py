"""Tests of moshi_core.formats.audio on the shared speech files."""

from __future__ import annotations

import io
import re
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from moshi_core.errors import AudioTooLongError, InvalidAudioError, InvalidParameterError
from moshi_core.formats import audio
from moshi_core.formats.audio import duration_seconds, load_audio, wav_bytes, write_wav
from moshi_core.formats.pcm import SAMPLE_RATE

MIMI_FRAME = 1920  # samples of one Mimi frame at 24 kHz: the tolerance for lossy codecs' delay


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _encode(wav: torch.Tensor, codec: str, container: str) -> bytes:
    """Encode 24 kHz mono `wav` [1, T] with PyAV into an in-memory file."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=SAMPLE_RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wav.numpy(), format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        # The encoder wants its own sample format and a fixed frame size.
        resampler = av.AudioResampler(
            format=stream.codec_context.format.name,
            layout="mono",
            rate=SAMPLE_RATE,
            frame_size=stream.codec_context.frame_size or None,
        )
        for chunk in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [
        ("en_question_24k.wav", 0),
        ("en_long_24k.wav", 0),
        ("en_short_16k.wav", 1),
        ("en_question_44k_stereo.wav", 1),
        ("fr_human_intro.mp3", MIMI_FRAME),
    ],
)
def test_shared_files_load_as_mono_24k(shared_audio: Path, name: str, tolerance: int) -> None:
    path = shared_audio / name
    wav = load_audio(path)
    assert wav.dtype == torch.float32
    assert wav.dim() == 2 and wav.shape[0] == 1
    info = sf.info(str(path))
    expected = info.frames * SAMPLE_RATE / info.samplerate
    assert abs(wav.shape[1] - expected) <= tolerance + 0.5
    assert torch.isfinite(wav).all()
    assert 0.01 < wav.abs().max() <= 1.0


def test_str_path_and_bytes_give_the_same_audio(shared_audio: Path) -> None:
    path = shared_audio / "en_short_16k.wav"
    from_path = load_audio(str(path))
    assert torch.equal(from_path, load_audio(path.read_bytes()))
    assert torch.equal(from_path, load_audio(path))


def test_short_16k_file_keeps_its_duration(shared_audio: Path) -> None:
    wav = load_audio(shared_audio / "en_short_16k.wav")
    assert duration_seconds(wav) == pytest.approx(0.77, abs=0.01)


def test_stereo_44k_matches_mono_24k_original(shared_audio: Path) -> None:
    original = load_audio(shared_audio / "en_question_24k.wav")[0].numpy()
    resampled = load_audio(shared_audio / "en_question_44k_stereo.wav")[0].numpy()
    assert abs(len(original) - len(resampled)) <= 1
    assert _correlation(original, resampled) > 0.95


def test_mp3_decodes_without_decoder_delay(shared_audio: Path) -> None:
    # FFmpeg trims the encoder delay and padding from the LAME header; libsndfile (mpg123)
    # does the same, so both decoders must agree sample for sample.
    path = shared_audio / "fr_human_intro.mp3"
    ffmpeg, rate = audio._decode_pyav(path, "mp3", None)
    with sf.SoundFile(str(path)) as snd:
        reference = snd.read(dtype="float32", always_2d=True).mean(axis=1)  # the decoders mix down to mono
        assert rate == snd.samplerate
    assert ffmpeg.shape == reference.shape
    assert np.abs(ffmpeg - reference).max() < 1e-4


def test_write_then_load_round_trip(tmp_path: Path, shared_audio: Path) -> None:
    wav = load_audio(shared_audio / "en_question_24k.wav")
    out = tmp_path / "out.wav"
    write_wav(out, wav)
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    back = load_audio(out)
    assert back.shape == wav.shape
    assert (back - wav).abs().max() <= 1.5 / 32767
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]  # no temporary file left


def test_write_wav_shapes_clipping_and_bytes(tmp_path: Path) -> None:
    t = torch.linspace(0, 1, 2400)
    stereo = torch.stack([torch.sin(2 * torch.pi * 440 * t), 1.5 * torch.ones_like(t)])
    stereo[1, :10] = -3.0
    out = tmp_path / "stereo.wav"
    write_wav(out, stereo, sample_rate=16000)
    data, rate = sf.read(str(out), dtype="float32", always_2d=True)
    assert rate == 16000 and data.shape == (2400, 2)
    assert data[10:, 1].min() == pytest.approx(32767 / 32768)
    assert data[:10, 1].max() == -32767 / 32768
    assert out.read_bytes() == wav_bytes(stereo, sample_rate=16000)
    mono = wav_bytes(stereo[0])
    assert mono == wav_bytes(stereo[:1])
    assert sf.info(io.BytesIO(mono)).channels == 1


def test_write_wav_replaces_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    out.write_bytes(b"old")
    write_wav(out, torch.zeros(1, 100))
    assert sf.info(str(out)).frames == 100


def test_write_wav_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidAudioError, match="NaN"):
        wav_bytes(torch.tensor([0.0, float("nan")]))
    with pytest.raises(InvalidParameterError, match=r"shape \[T\] or \[C, T\]"):
        wav_bytes(torch.zeros(1, 1, 10))
    with pytest.raises(InvalidParameterError, match="sample_rate"):
        wav_bytes(torch.zeros(10), sample_rate=0)


def test_ogg_opus_loads_aligned(shared_audio: Path) -> None:
    wav = load_audio(shared_audio / "en_question_24k.wav")
    decoded = load_audio(_encode(wav, "libopus", "ogg"))
    # The Opus pre-skip must be removed: same length and no shift, so the lossy copy
    # still correlates closely with the original sample by sample.
    assert decoded.shape == wav.shape
    assert _correlation(wav[0].numpy(), decoded[0].numpy()) > 0.9


def test_format_only_ffmpeg_knows_loads(tmp_path: Path, shared_audio: Path) -> None:
    wav = load_audio(shared_audio / "en_question_24k.wav")
    path = tmp_path / "speech.m4a"
    path.write_bytes(_encode(wav, "aac", "mp4"))
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(path))  # so the FFmpeg fallback is what reads it
    decoded = load_audio(path)
    assert decoded.dtype == torch.float32 and decoded.shape[0] == 1
    assert abs(decoded.shape[1] - wav.shape[1]) <= MIMI_FRAME


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidAudioError, match=r"'.*nope\.wav' does not exist"):
        load_audio(tmp_path / "nope.wav")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidAudioError, match="not a regular file"):
        load_audio(tmp_path)


def test_empty_file_and_empty_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(InvalidAudioError, match=r"'.*empty\.wav' is empty"):
        load_audio(path)
    with pytest.raises(InvalidAudioError, match="is empty"):
        load_audio(b"")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.txt", b"this is a text file, not audio\n" * 20),
        ("garbage.wav", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
        ("riff.wav", b"RIFF" + bytes(4000)),
    ],
)
def test_not_audio(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    formats = "supported formats are wav, flac, ogg/opus, mp3"
    expected = re.escape(f"could not decode '{path}' as audio: {formats}")
    with pytest.raises(InvalidAudioError, match=expected):
        load_audio(path)
    with pytest.raises(InvalidAudioError, match="could not decode the input data as audio"):
        load_audio(content)


def test_truncated_wav(tmp_path: Path, shared_audio: Path) -> None:
    content = (shared_audio / "en_question_24k.wav").read_bytes()
    cut_in_header = tmp_path / "cut.wav"
    cut_in_header.write_bytes(content[:30])
    with pytest.raises(InvalidAudioError, match="could not decode"):
        load_audio(cut_in_header)
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(content[:44])
    with pytest.raises(InvalidAudioError, match="truncated: its header announces 6.9 s of audio but it holds 0.00 s"):
        load_audio(header_only)
    cut_in_data = content[: len(content) // 3]
    with pytest.raises(InvalidAudioError, match="truncated: its header announces 6.9 s of audio but it holds 2.30 s"):
        load_audio(cut_in_data)
    # A header that announces hours is refused before anything is decoded, as too long.
    with pytest.raises(AudioTooLongError, match="announces 6.9 s of audio in its header; the limit is 5 s"):
        load_audio(cut_in_data, max_seconds=5)
    # Streaming writers leave the length unknown (0xFFFFFFFF): such a file is read as it is.
    streamed = bytearray(content)
    streamed[40:44] = b"\xff\xff\xff\xff"
    assert load_audio(bytes(streamed)).shape[1] == 165666


def test_header_without_samples(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(InvalidAudioError, match="contains no audio samples"):
        load_audio(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_samples(tmp_path: Path, bad: float) -> None:
    samples = np.zeros(2400, dtype=np.float32)
    samples[1000] = bad
    path = tmp_path / "bad.wav"
    sf.write(str(path), samples, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(InvalidAudioError, match="NaN or infinite"):
        load_audio(path)


def test_over_max_seconds_wav(shared_audio: Path) -> None:
    expected = r"en_long_24k\.wav' is 16\.1 s long; the limit is 10 s"
    with pytest.raises(InvalidAudioError, match=expected):
        load_audio(shared_audio / "en_long_24k.wav", max_seconds=10)
    assert load_audio(shared_audio / "en_long_24k.wav", max_seconds=16.2).shape[1] > 0


def test_over_max_seconds_mp3_from_header(shared_audio: Path) -> None:
    # The exact duration in the message comes from the container header: decoding would
    # stop at the limit and could only say "more than 10 s".
    expected = r"fr_human_intro\.mp3' is 23\.5 s long; the limit is 10 s"
    with pytest.raises(InvalidAudioError, match=expected):
        load_audio(shared_audio / "fr_human_intro.mp3", max_seconds=10)


def test_over_max_seconds_bytes(shared_audio: Path) -> None:
    content = (shared_audio / "en_question_24k.wav").read_bytes()
    expected = r"the input data is 6\.9 s long; the limit is 2\.5 s"
    with pytest.raises(InvalidAudioError, match=expected):
        load_audio(content, max_seconds=2.5)


def test_max_seconds_must_be_positive(shared_audio: Path) -> None:
    with pytest.raises(InvalidParameterError, match="max_seconds"):
        load_audio(shared_audio / "en_short_16k.wav", max_seconds=0)

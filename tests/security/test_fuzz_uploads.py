"""Fuzzing the upload validators: `load_audio` and `load_tokens` on mutated and random files.

The property, for any bytes: the loader returns a valid result (audio: finite float32 [1, T]
at 24 kHz within the length limit; tokens: a MimiTokens that survives its own round trip)
or raises one of our typed errors (`MoshiError`). Never another exception, never a hang,
never more memory than a fixed cap: each input runs in one child process whose address
space is capped (RLIMIT_AS) and which is killed when it takes too long.

Examples are derandomized and the database is off, so CI sees the same inputs each run and
the checkout gets no `.hypothesis/` folder.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moshi_core.formats.tokens import MimiTokens, tokens_to_bytes

MAX_SECONDS = 60.0  # the limit the tests' servers run with (MOSHI_MAX_AUDIO_SECONDS)
MEMORY_CAP = 2**30  # address space the child may add to what its imports took
EXAMPLE_TIMEOUT = 20.0  # seconds; a decode of these few-kB inputs takes milliseconds
FUZZ = settings(max_examples=200, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Values a header field is set to: zero, one, signed and unsigned limits.
EXTREMES = (0, 1, 2, 255, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1)


# ---------------------------------------------------------------- the sandboxed child


def _check_audio(data: bytes, max_seconds: float) -> str:
    from moshi_core.formats.audio import load_audio
    from moshi_core.formats.pcm import SAMPLE_RATE

    wav = load_audio(data, max_seconds=max_seconds, label="upload")
    # soxr may round the resampled length up by a sample or so.
    limit = max_seconds * SAMPLE_RATE + 16
    if not (wav.dtype == torch.float32 and wav.dim() == 2 and wav.shape[0] == 1 and 0 < wav.shape[1] <= limit):
        return f"invalid audio tensor {wav.dtype} {list(wav.shape)}"
    if not torch.isfinite(wav).all():
        return "audio holds NaN or inf"
    return ""


def _check_tokens(data: bytes, max_seconds: float) -> str:  # token files carry no duration limit
    from moshi_core.formats.tokens import load_tokens

    tokens = load_tokens(data, label="upload")
    if not isinstance(tokens, MimiTokens):
        return f"load_tokens returned {type(tokens).__name__}"
    again = load_tokens(tokens_to_bytes(tokens))  # validates once more, as a save would
    if not (again.codes.equal(tokens.codes) and again.num_samples == tokens.num_samples):
        return "tokens do not survive their own round trip"
    return ""


CHECKS: dict[str, Callable[[bytes, float], str]] = {"audio": _check_audio, "tokens": _check_tokens}


def _serve(conn: Connection) -> None:
    """Child loop: (check name, bytes, max_seconds) in, (outcome, detail) out."""
    import resource

    import moshi_core.formats.audio  # noqa: F401  (imports first, so the cap is for the input's work)
    from moshi_core.errors import MoshiError

    torch.set_num_threads(1)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + MEMORY_CAP, resource.getrlimit(resource.RLIMIT_AS)[1]))
    conn.send(("ready", ""))
    while True:
        check, data, max_seconds = conn.recv()
        try:
            problem = CHECKS[check](data, max_seconds)
            conn.send(("invalid", problem) if problem else ("ok", ""))
        except MoshiError as e:
            conn.send(("typed", f"{type(e).__name__}: {e}"))
        except BaseException as e:  # noqa: BLE001 - the point is to report anything else
            conn.send(("untyped", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))


class Sandbox:
    """One capped child process that runs the checks; restarted after a hang or a crash."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._conn, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(120):
            raise RuntimeError("the fuzzing child did not start")
        self._conn.recv()

    def run(self, check: str, data: bytes, max_seconds: float = MAX_SECONDS) -> tuple[str, str]:
        self._conn.send((check, data, max_seconds))
        try:
            if self._conn.poll(EXAMPLE_TIMEOUT):
                return self._conn.recv()
            outcome = ("hang", f"no answer within {EXAMPLE_TIMEOUT:g} s")
        except EOFError:
            outcome = ("crash", f"the child died (exit code {self._process.exitcode})")
        self.close()
        self._start()
        return outcome

    def close(self) -> None:
        self._process.kill()
        self._process.join()
        self._conn.close()


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


def assert_safe(sandbox: Sandbox, check: str, data: bytes, max_seconds: float = MAX_SECONDS) -> None:
    outcome, detail = sandbox.run(check, data, max_seconds)
    assert outcome in ("ok", "typed"), f"{outcome} on {len(data)} bytes starting {data[:48]!r}: {detail}"


# ---------------------------------------------------------------- valid files to mutate


def _tone(rate: int, seconds: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None]


def _encoded(format: str, subtype: str, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, _tone(rate), rate, format=format, subtype=subtype)
    return buffer.getvalue()


AUDIO_SEEDS = {
    "wav": _encoded("WAV", "PCM_16", 24000),
    "wav-float": _encoded("WAV", "FLOAT", 44100),
    "flac": _encoded("FLAC", "PCM_16", 16000),
    "ogg-vorbis": _encoded("OGG", "VORBIS", 24000),
    "ogg-opus": _encoded("OGG", "OPUS", 48000),
    "mp3": _encoded("MP3", "MPEG_LAYER_III", 24000),
    "aiff": _encoded("AIFF", "PCM_16", 8000),
}


def _tokens(batch: int, frames: int) -> bytes:
    codes = torch.randint(0, 2048, (batch, 8, frames), generator=torch.Generator().manual_seed(0))
    return tokens_to_bytes(MimiTokens(codes=codes, num_samples=[frames * 1920] * batch, codec="mimi-test"))


TOKEN_SEEDS = {"one": _tokens(1, 5), "batch": _tokens(3, 4)}


def test_seeds_are_valid(sandbox: Sandbox) -> None:
    """The mutations start from files the loaders accept."""
    for data in AUDIO_SEEDS.values():
        assert sandbox.run("audio", data) == ("ok", "")
    for data in TOKEN_SEEDS.values():
        assert sandbox.run("tokens", data) == ("ok", "")


# ---------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Field:
    """An integer of `width` bytes at `offset` of a file, set to `value` (masked to the width)."""

    offset: int
    width: int
    value: int
    byteorder: str

    def apply(self, data: bytes) -> bytes:
        if self.offset + self.width > len(data):
            return data
        raw = (self.value & (2 ** (8 * self.width) - 1)).to_bytes(self.width, self.byteorder)
        return data[: self.offset] + raw + data[self.offset + self.width :]


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> bytes:
    """A valid file with bits flipped, cut short, overwritten, or a header field set to an extreme."""
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "field"]))
        if kind == "flip":
            for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=16)):
                data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(1, len(data) - 1)) :]
        elif kind == "overwrite":
            start = draw(st.integers(0, len(data) - 1))
            patch = draw(st.binary(min_size=1, max_size=64))
            data[start : start + len(patch)] = patch
        else:
            # Headers sit in the first bytes of every one of these formats.
            field = Field(draw(st.integers(0, min(len(data), 128) - 1)), draw(st.sampled_from([1, 2, 4, 8])),
                          draw(st.sampled_from(EXTREMES)), draw(st.sampled_from(["little", "big"])))
            data[:] = field.apply(bytes(data))
        if len(data) < 2:
            break
    return bytes(data)


MAGICS = (b"", b"RIFF\xff\xff\xff\xffWAVEfmt ", b"fLaC", b"OggS\x00\x02", b"ID3\x04\x00", b"\xff\xfb\x90\x64",
          b"FORM\x00\x00\x00\x00AIFF", b"caff\x00\x01", b"\x8e\x1f\xd7\x5a")


@st.composite
def random_file(draw: st.DrawFn) -> bytes:
    """Random bytes, often behind a format's magic so that its parser gets past the first check."""
    return draw(st.sampled_from(MAGICS)) + draw(st.binary(max_size=2048))


def wav_file(channels: int, rate: int, byte_rate: int, block_align: int, bits: int, fmt_tag: int,
             riff_size: int, data_size: int, body: bytes) -> bytes:
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, byte_rate, block_align, bits)
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", data_size) + body)


def _u(bits: int) -> st.SearchStrategy[int]:
    """An unsigned integer of `bits` bits, with the extremes drawn often."""
    top = 2**bits - 1
    return st.one_of(st.sampled_from([v for v in EXTREMES if v <= top] + [top]), st.integers(0, top))


def flac_streaminfo(data: bytes, rate: int, channels: int, bits: int, total_frames: int) -> bytes:
    """`data` (a FLAC file) with its STREAMINFO rate (20 bits), channels (3), bits per sample (5)
    and total frames (36) replaced."""
    packed = (rate << 44) | ((channels - 1) << 41) | ((bits - 1) << 36) | total_frames
    return data[:18] + packed.to_bytes(8, "big") + data[26:]


# ---------------------------------------------------------------- audio properties


@FUZZ
@given(data=mutated(AUDIO_SEEDS))
def test_mutated_audio_is_decoded_or_refused(sandbox: Sandbox, data: bytes) -> None:
    assert_safe(sandbox, "audio", data)


@FUZZ
@given(data=random_file())
def test_random_bytes_are_refused(sandbox: Sandbox, data: bytes) -> None:
    assert_safe(sandbox, "audio", data)


@FUZZ
@given(channels=_u(16), rate=_u(32), byte_rate=_u(32), block_align=_u(16), bits=_u(16),
       fmt_tag=st.sampled_from([0, 1, 3, 6, 7, 0x11, 0xFFFE, 0xFFFF]), riff_size=_u(32), data_size=_u(32),
       body=st.binary(max_size=4096))
def test_wav_header_fields_at_extremes(sandbox: Sandbox, channels: int, rate: int, byte_rate: int,
                                       block_align: int, bits: int, fmt_tag: int, riff_size: int,
                                       data_size: int, body: bytes) -> None:
    """Rate 0 or 2**31, channels 0 or 65535, sizes that lie about the body."""
    data = wav_file(channels, rate, byte_rate, block_align, bits, fmt_tag, riff_size, data_size, body)
    assert_safe(sandbox, "audio", data)


@FUZZ
@given(rate=_u(20), channels=st.integers(1, 8), bits=st.sampled_from([4, 8, 16, 24, 32]), total=_u(36))
def test_flac_streaminfo_at_extremes(sandbox: Sandbox, rate: int, channels: int, bits: int, total: int) -> None:
    """Rate 0 to 2**20 - 1, 1 to 8 channels, any frame count, on a real FLAC body: libsndfile
    sizes its output array from STREAMINFO before it reads a frame."""
    assert_safe(sandbox, "audio", flac_streaminfo(AUDIO_SEEDS["flac"], rate, channels, bits, total))


@pytest.mark.parametrize("rate, channels, seconds, limit", [
    pytest.param(655350, 8, 599, 600, id="655kHz-8ch-599s"),  # 11.7 GiB
    pytest.param(655350, 2, 599, 600, id="655kHz-2ch-599s"),  # 2.9 GiB
    pytest.param(655350, 8, 60, 60, id="655kHz-8ch-60s"),  # 1.2 GiB
])
def test_flac_decoding_bomb(sandbox: Sandbox, rate: int, channels: int, seconds: int, limit: float) -> None:
    """A 2 kB FLAC whose STREAMINFO announces gigabytes of samples within the duration limit."""
    data = flac_streaminfo(AUDIO_SEEDS["flac"], rate, channels, 16, rate * seconds)
    assert_safe(sandbox, "audio", data, max_seconds=limit)


@pytest.mark.parametrize("rate", [96000, 192000])
def test_one_frame_at_a_high_rate(sandbox: Sandbox, rate: int) -> None:
    """One sample at 96 kHz is 0.5 samples at 24 kHz: refused as holding no audio, not returned as [1, 0]."""
    buffer = io.BytesIO()
    sf.write(buffer, np.full((1, 1), 0.1, np.float32), rate, format="WAV")
    assert_safe(sandbox, "audio", buffer.getvalue())


# ---------------------------------------------------------------- token properties


@FUZZ
@given(data=mutated(TOKEN_SEEDS))
def test_mutated_token_files_are_read_or_refused(sandbox: Sandbox, data: bytes) -> None:
    assert_safe(sandbox, "tokens", data)


def _header(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def with_header(data: bytes, header: dict | bytes) -> bytes:
    """`data` (a safetensors file) with its JSON header replaced, the tensor bytes kept."""
    (length,) = struct.unpack("<Q", data[:8])
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


SAFETENSORS_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64",
                      "F8_E4M3", "F8_E5M2", "C64", "XYZ")
METADATA_TEXT = st.one_of(
    st.sampled_from(["", "0", "-1", "1", "8", "33", "24000", "24000.0", "12.5", "1e999", "nan", "inf", "-inf",
                     "1_920", "\uff18", "9" * 5000, ",", "1,,2", "9600,9600", "moshi-core.mimi-tokens", "2"]),
    st.text(max_size=40))
METADATA_KEYS = ("format", "format_version", "sample_rate", "frame_rate", "num_codebooks", "num_samples", "codec")


@st.composite
def rewritten_header(draw: st.DrawFn) -> bytes:
    """A token file whose header says something else: another dtype, shape or offsets, metadata
    out of range or of the wrong JSON type, extra tensors, or a header that is not JSON at all."""
    data = TOKEN_SEEDS[draw(st.sampled_from(sorted(TOKEN_SEEDS)))]
    if draw(st.integers(0, 9)) == 0:
        return with_header(data, draw(st.binary(max_size=200)))
    header = _header(data)
    codes, meta = header["codes"], header["__metadata__"]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "metadata", "meta-type", "drop", "tensor"]))
        if kind == "dtype":
            codes["dtype"] = draw(st.sampled_from(SAFETENSORS_DTYPES))
        elif kind == "shape":
            codes["shape"] = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 10, 33, 2**31, 2**63]), max_size=4))
        elif kind == "offsets":
            codes["data_offsets"] = [draw(st.sampled_from([0, 1, 80, 2**32, 2**63])) for _ in range(2)]
        elif kind == "metadata":
            meta[draw(st.sampled_from(METADATA_KEYS))] = draw(METADATA_TEXT)
        elif kind == "meta-type":
            meta[draw(st.sampled_from(METADATA_KEYS))] = draw(st.sampled_from([None, 1, 12.5, [], {}, True]))
        elif kind == "drop":
            meta.pop(draw(st.sampled_from(METADATA_KEYS)), None)
        else:
            header[draw(st.sampled_from(["extra", "__metadata__x", ""]))] = dict(codes)
    return with_header(data, header)


@FUZZ
@given(data=rewritten_header())
def test_token_headers_that_lie_are_refused(sandbox: Sandbox, data: bytes) -> None:
    assert_safe(sandbox, "tokens", data)


@FUZZ
@given(shape=st.lists(st.integers(0, 9), max_size=4),
       dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                              torch.float16, torch.bfloat16, torch.float32]),
       low=st.integers(-70000, 2047), span=st.integers(1, 70000),
       meta=st.dictionaries(st.sampled_from(METADATA_KEYS), METADATA_TEXT, max_size=7),
       base=st.booleans())
def test_token_files_of_any_shape_dtype_and_metadata(sandbox: Sandbox, shape: list[int], dtype: torch.dtype,
                                                     low: int, span: int, meta: dict[str, str],
                                                     base: bool) -> None:
    """Well-formed safetensors files whose codes and metadata are anything: the validator's job."""
    import safetensors.torch

    codes = torch.randint(low, low + span, shape, generator=torch.Generator().manual_seed(len(shape)))
    valid = {"format": "moshi-core.mimi-tokens", "format_version": "1", "sample_rate": "24000",
             "frame_rate": "12.5", "num_codebooks": str(shape[-2] if len(shape) >= 2 else 8),
             "num_samples": str(1920 * (shape[-1] if shape else 1)), "codec": "mimi-test"}
    metadata = {**valid, **meta} if base else meta
    data = safetensors.torch.save({"codes": codes.to(dtype)}, metadata=metadata)
    assert_safe(sandbox, "tokens", data)

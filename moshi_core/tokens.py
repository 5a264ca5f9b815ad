"""The Mimi token file: Mimi codes plus what is needed to decode them, in a safetensors file.

One tensor `codes` (int16, [K, F] for one item or [B, K, F] for a batch) and string
metadata: format, format_version, sample_rate, frame_rate, num_codebooks, num_samples
(comma-separated, one per item) and codec (the checkpoint that made the codes).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from moshi_core.audio import atomic_write_bytes
from moshi_core.errors import InvalidTokenFileError

FORMAT_NAME = "moshi-core.mimi-tokens"
FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
SAMPLE_RATE = 24000
FRAME_RATE = 12.5
SAMPLES_PER_FRAME = 1920  # SAMPLE_RATE / FRAME_RATE
CARDINALITY = 2048
MAX_CODEBOOKS = 32

TokenSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True, eq=False)
class MimiTokens:
    """Mimi codes of one or more audio items; always valid once built.

    `codes` may be given as [K, F] or [B, K, F] of any integer dtype; it is kept as
    [B, K, F] int64. `batched` says whether the file form is [B, K, F] (True) or [K, F].
    """

    codes: torch.Tensor
    num_samples: list[int]
    codec: str
    sample_rate: int = SAMPLE_RATE
    frame_rate: float = FRAME_RATE
    batched: bool = True

    def __post_init__(self) -> None:
        codes, batched = self.codes, self.batched
        if isinstance(codes, torch.Tensor) and codes.dim() == 2:
            codes, batched = codes.unsqueeze(0), False
        _validate(codes, self.num_samples, self.codec, self.sample_rate, self.frame_rate, batched, "tokens")
        # Frozen dataclass: normalise the fields through object.__setattr__.
        object.__setattr__(self, "codes", codes.to(torch.int64))
        object.__setattr__(self, "num_samples", [int(n) for n in self.num_samples])
        object.__setattr__(self, "batched", batched)

    @property
    def batch_size(self) -> int:
        return self.codes.shape[0]

    @property
    def num_codebooks(self) -> int:
        return self.codes.shape[1]

    @property
    def num_frames(self) -> int:
        return self.codes.shape[2]


def tokens_to_bytes(tokens: MimiTokens) -> bytes:
    """Serialise `tokens` as a Mimi token file in memory (validated first)."""
    codes, metadata = _to_file_form(tokens)
    return safetensors.torch.save({"codes": codes}, metadata=metadata)


def save_tokens(path: str | os.PathLike[str], tokens: MimiTokens) -> None:
    """Write `tokens` as a Mimi token file at `path`, atomically (validated first)."""
    atomic_write_bytes(path, tokens_to_bytes(tokens))


def load_tokens(source: TokenSource) -> MimiTokens:
    """Read and validate a Mimi token file from a path or from its content as bytes."""
    where = "token data" if isinstance(source, bytes) else f"token file '{os.fspath(source)}'"
    data = source if isinstance(source, bytes) else _read_file(Path(source), where)
    if not data:
        raise InvalidTokenFileError(f"{where} is empty")
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError) as e:
        raise InvalidTokenFileError(f"{where} is not a readable safetensors file: {e}") from e

    if "codes" not in tensors:
        raise InvalidTokenFileError(f"{where} has no 'codes' tensor")
    extra = sorted(set(tensors) - {"codes"})
    if extra:
        raise InvalidTokenFileError(f"{where} has unexpected tensors {extra}; only 'codes' is allowed")
    codes = tensors["codes"]

    meta = _read_metadata(data)
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise InvalidTokenFileError(
            f"{where} is not a Mimi token file: format is {fmt!r}, expected {FORMAT_NAME!r}"
        )
    version = meta.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidTokenFileError(
            f"{where} has format_version {version!r}; supported versions: {', '.join(SUPPORTED_VERSIONS)}"
        )
    sample_rate = _parse(meta, "sample_rate", int, where)
    frame_rate = _parse(meta, "frame_rate", float, where)
    num_codebooks = _parse(meta, "num_codebooks", int, where)
    num_samples = [_parse_int(s, "num_samples", where) for s in _require(meta, "num_samples", where).split(",")]
    codec = _require(meta, "codec", where)

    batched = codes.dim() == 3
    if codes.dim() == 2:
        codes = codes.unsqueeze(0)
    _validate(codes, num_samples, codec, sample_rate, frame_rate, batched, where)
    if num_codebooks != codes.shape[1]:
        raise InvalidTokenFileError(
            f"{where}: num_codebooks metadata is {num_codebooks} but codes has {codes.shape[1]} codebooks"
        )
    return MimiTokens(codes, num_samples, codec, sample_rate, frame_rate, batched)


def _to_file_form(tokens: MimiTokens) -> tuple[torch.Tensor, dict[str, str]]:
    _validate(
        tokens.codes, tokens.num_samples, tokens.codec, tokens.sample_rate, tokens.frame_rate, tokens.batched, "tokens"
    )
    codes = tokens.codes.detach().to("cpu", torch.int16)
    if not tokens.batched:
        codes = codes[0]
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sample_rate": str(tokens.sample_rate),
        "frame_rate": f"{tokens.frame_rate:g}",
        "num_codebooks": str(tokens.num_codebooks),
        "num_samples": ",".join(str(int(n)) for n in tokens.num_samples),
        "codec": tokens.codec,
    }
    return codes.contiguous(), metadata


def _validate(
    codes: object,
    num_samples: object,
    codec: object,
    sample_rate: object,
    frame_rate: object,
    batched: bool,
    where: str,
) -> None:
    """Check codes ([B, K, F]) and their description; raise InvalidTokenFileError naming `where`."""

    def fail(message: str) -> InvalidTokenFileError:
        return InvalidTokenFileError(f"{where}: {message}")

    if not isinstance(codes, torch.Tensor):
        raise fail(f"codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise fail(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() != 3:
        raise fail(f"codes must have shape [K, F] or [B, K, F], got {list(codes.shape)}")
    batch, k, frames = codes.shape
    if batch == 0:
        raise fail("codes holds an empty batch (B = 0)")
    if not batched and batch != 1:
        raise fail(f"an unbatched token set holds exactly one item, got B = {batch}")
    if not 1 <= k <= MAX_CODEBOOKS:
        raise fail(f"number of codebooks must be in 1..{MAX_CODEBOOKS}, got {k}")
    if frames == 0:
        raise fail("codes has no frames (F = 0)")

    bad = (codes < 0) | (codes >= CARDINALITY)
    num_bad = int(bad.sum())
    if num_bad:
        first = [int(i) for i in bad.nonzero()[0]]
        value = int(codes[tuple(first)])
        position = first if batched else first[1:]
        raise fail(
            f"{num_bad} code(s) outside [0, {CARDINALITY}); the first is {value} at codes{position}"
        )

    if sample_rate != SAMPLE_RATE:
        raise fail(f"sample_rate must be {SAMPLE_RATE}, got {sample_rate}")
    if frame_rate != FRAME_RATE:
        raise fail(f"frame_rate must be {FRAME_RATE:g}, got {frame_rate}")
    if not isinstance(codec, str) or not codec:
        raise fail("codec must be a non-empty string naming the Mimi checkpoint")

    if not isinstance(num_samples, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in num_samples
    ):
        raise fail("num_samples must be a list of integers, one per item")
    if len(num_samples) != batch:
        raise fail(f"num_samples has {len(num_samples)} value(s) but the batch has {batch} item(s)")
    low, high = (frames - 1) * SAMPLES_PER_FRAME, frames * SAMPLES_PER_FRAME
    for i, n in enumerate(num_samples):
        if not low < n <= high:
            raise fail(
                f"num_samples[{i}] = {n} does not match {frames} frame(s): "
                f"it must be in {low + 1}..{high} ({SAMPLES_PER_FRAME} samples per frame)"
            )


def _read_file(path: Path, where: str) -> bytes:
    if not path.exists():
        raise InvalidTokenFileError(f"{where} does not exist")
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidTokenFileError(f"cannot read {where}: {e.strerror}") from e


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors has no public call for the metadata of in-memory bytes; its header is an
    # 8-byte little-endian length then JSON, already checked by safetensors.torch.load.
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__") or {}


def _require(meta: dict[str, str], key: str, where: str) -> str:
    if key not in meta:
        raise InvalidTokenFileError(f"{where} is missing the '{key}' metadata")
    return meta[key]


def _parse_int(text: str, key: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InvalidTokenFileError(f"{where}: metadata '{key}' must be an integer, got {text!r}") from None


def _parse(meta: dict[str, str], key: str, kind: type[int] | type[float], where: str) -> int | float:
    text = _require(meta, key, where)
    if kind is int:
        return _parse_int(text, key, where)
    try:
        return float(text)
    except ValueError:
        raise InvalidTokenFileError(f"{where}: metadata '{key}' must be a number, got {text!r}") from None

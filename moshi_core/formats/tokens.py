"""The Mimi token file: Mimi codes plus what is needed to decode them, in a safetensors file.

One tensor `codes` (int16, [K, F] for one item or [B, K, F] for a batch) and string
metadata: format, format_version, sample_rate, frame_rate, num_codebooks, num_samples
(comma-separated, one per item) and codec (the checkpoint that made the codes).
"""

from __future__ import annotations

import json
import operator
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from moshi_core.errors import InvalidTokenFileError
from moshi_core.formats.audio import atomic_write_bytes
from moshi_core.formats.pcm import SAMPLE_RATE

FORMAT_NAME = "moshi-core.mimi-tokens"
FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
FRAME_RATE = 12.5
SAMPLES_PER_FRAME = 1920  # SAMPLE_RATE / FRAME_RATE
CARDINALITY = 2048
MAX_CODEBOOKS = 32

TokenSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == has no single truth value
class MimiTokens:
    """Mimi codes of one or more audio items, valid by construction.

    `codes` may be given as [K, F] (then `batched` becomes False) or [B, K, F], of any
    integer dtype; it is kept as [B, K, F] int64. `batched` says which shape the file has.
    Raises `InvalidTokenFileError` when the codes or their description are out of range.
    """

    codes: torch.Tensor
    num_samples: list[int]
    codec: str
    sample_rate: int = SAMPLE_RATE
    frame_rate: float = FRAME_RATE
    batched: bool = True

    def __post_init__(self) -> None:
        # Frozen dataclass: fields are normalised through object.__setattr__.
        if isinstance(self.codes, torch.Tensor) and self.codes.dim() == 2:
            object.__setattr__(self, "codes", self.codes.unsqueeze(0))
            object.__setattr__(self, "batched", False)
        _validate(self)
        object.__setattr__(self, "codes", self.codes.to(torch.int64))
        object.__setattr__(self, "num_samples", [operator.index(n) for n in self.num_samples])

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
    # The codes tensor stays mutable inside the frozen dataclass, so check again.
    _validate(tokens)
    codes = tokens.codes.detach().to("cpu", torch.int16)
    if not tokens.batched:
        codes = codes[0]
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sample_rate": str(tokens.sample_rate),
        "frame_rate": f"{tokens.frame_rate:g}",
        "num_codebooks": str(tokens.num_codebooks),
        "num_samples": ",".join(str(n) for n in tokens.num_samples),
        "codec": tokens.codec,
    }
    return safetensors.torch.save({"codes": codes.contiguous()}, metadata=metadata)


def save_tokens(path: str | os.PathLike[str], tokens: MimiTokens) -> None:
    """Write `tokens` as a Mimi token file at `path`, atomically (validated first)."""
    atomic_write_bytes(path, tokens_to_bytes(tokens))


def load_tokens(source: TokenSource, label: str | None = None) -> MimiTokens:
    """Read and validate a Mimi token file from a path or from its content as bytes.

    `label` names the input in error messages (e.g. an uploaded file's name)."""
    where = label or ("token data" if isinstance(source, bytes) else f"token file '{os.fspath(source)}'")
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
        raise InvalidTokenFileError(
            f"{where} has unexpected tensors {extra}; only 'codes' is allowed"
        )

    meta = _read_metadata(data)
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise InvalidTokenFileError(
            f"{where} is not a Mimi token file: format is {fmt!r}, expected {FORMAT_NAME!r}"
        )
    version = meta.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidTokenFileError(
            f"{where} has format_version {version!r}; "
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}"
        )
    fields = _MetadataReader(meta, where)
    num_codebooks = fields.integer("num_codebooks")
    try:
        tokens = MimiTokens(
            codes=tensors["codes"],
            num_samples=fields.integers("num_samples"),
            codec=fields.text("codec"),
            sample_rate=fields.integer("sample_rate"),
            frame_rate=fields.number("frame_rate"),
            batched=tensors["codes"].dim() == 3,
        )
    except InvalidTokenFileError as e:
        raise InvalidTokenFileError(f"{where}: {e}") from None
    if num_codebooks != tokens.num_codebooks:
        raise InvalidTokenFileError(
            f"{where}: num_codebooks metadata is {num_codebooks} "
            f"but codes has {tokens.num_codebooks} codebooks"
        )
    return tokens


def _validate(tokens: MimiTokens) -> None:
    """Check codes (already [B, K, F]) and their description; the caller names the file."""
    codes = tokens.codes
    if not isinstance(codes, torch.Tensor):
        raise InvalidTokenFileError(f"codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise InvalidTokenFileError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() != 3:
        raise InvalidTokenFileError(
            f"codes must have shape [K, F] or [B, K, F], got {list(codes.shape)}"
        )
    batch, k, frames = codes.shape
    if batch == 0:
        raise InvalidTokenFileError("codes holds an empty batch (B = 0)")
    if not tokens.batched and batch != 1:
        raise InvalidTokenFileError(f"unbatched tokens hold exactly one item, got B = {batch}")
    if not 1 <= k <= MAX_CODEBOOKS:
        raise InvalidTokenFileError(f"number of codebooks must be in 1..{MAX_CODEBOOKS}, got {k}")
    if frames == 0:
        raise InvalidTokenFileError("codes has no frames (F = 0)")

    wide = codes.to(torch.int64)  # unsigned dtypes lack comparison kernels
    bad = (wide < 0) | (wide >= CARDINALITY)
    num_bad = int(bad.sum())
    if num_bad:
        first = [int(i) for i in bad.nonzero()[0]]
        value = int(wide[tuple(first)])
        position = first if tokens.batched else first[1:]
        raise InvalidTokenFileError(
            f"{num_bad} code(s) outside [0, {CARDINALITY}); the first is {value} at codes{position}"
        )

    if tokens.sample_rate != SAMPLE_RATE:
        raise InvalidTokenFileError(f"sample_rate must be {SAMPLE_RATE}, got {tokens.sample_rate}")
    if tokens.frame_rate != FRAME_RATE:
        raise InvalidTokenFileError(f"frame_rate must be {FRAME_RATE:g}, got {tokens.frame_rate}")
    if not isinstance(tokens.codec, str) or not tokens.codec:
        raise InvalidTokenFileError("codec must be a non-empty string naming the Mimi checkpoint")

    num_samples = tokens.num_samples
    if not isinstance(num_samples, (list, tuple)) or not all(map(_is_integer, num_samples)):
        raise InvalidTokenFileError("num_samples must be a list of integers, one per item")
    if len(num_samples) != batch:
        raise InvalidTokenFileError(
            f"num_samples has {len(num_samples)} value(s) but the batch has {batch} item(s)"
        )
    # Items of a batch are padded to the longest: each fits in the frames, the longest fills them.
    low, high = (frames - 1) * SAMPLES_PER_FRAME, frames * SAMPLES_PER_FRAME
    for i, n in enumerate(num_samples):
        if not 0 < n <= high:
            raise InvalidTokenFileError(
                f"num_samples[{i}] = {n} does not fit {frames} frame(s): it must be in "
                f"1..{high} ({SAMPLES_PER_FRAME} samples per frame)"
            )
    if not max(num_samples) > low:
        raise InvalidTokenFileError(
            f"num_samples (longest {max(num_samples)}) does not match {frames} frame(s): the longest item "
            f"must be in {low + 1}..{high} ({SAMPLES_PER_FRAME} samples per frame)"
        )


def _is_integer(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


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


class _MetadataReader:
    """Typed access to the string metadata, with errors that name the file and the key."""

    def __init__(self, meta: dict[str, str], where: str) -> None:
        self.meta = meta
        self.where = where

    def text(self, key: str) -> str:
        if key not in self.meta:
            raise InvalidTokenFileError(f"{self.where} is missing the '{key}' metadata")
        return self.meta[key]

    def integer(self, key: str, text: str | None = None) -> int:
        text = self.text(key) if text is None else text
        try:
            return int(text)
        except ValueError:
            raise self._error(key, "an integer", text) from None

    def integers(self, key: str) -> list[int]:
        text = self.text(key)
        return [self.integer(key, part) for part in text.split(",")] if text else []

    def number(self, key: str) -> float:
        text = self.text(key)
        try:
            return float(text)
        except ValueError:
            raise self._error(key, "a number", text) from None

    def _error(self, key: str, kind: str, text: str) -> InvalidTokenFileError:
        return InvalidTokenFileError(f"{self.where}: metadata '{key}' must be {kind}, got {text!r}")

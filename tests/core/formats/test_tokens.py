"""Tests of the Mimi token file (moshi_core.formats.tokens)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from moshi_core.errors import InvalidTokenFileError
from moshi_core.formats.tokens import MimiTokens, load_tokens, save_tokens, tokens_to_bytes

CODEC = "kyutai/moshika-pytorch-bf16/tokenizer-e351c8d8-checkpoint125.safetensors"


def _codes(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2048, shape, generator=torch.Generator().manual_seed(seed))


def _metadata(**overrides: str | None) -> dict[str, str]:
    """Valid metadata for codes of 8 codebooks and 10 frames; None removes a key."""
    meta: dict[str, str | None] = {
        "format": "moshi-core.mimi-tokens",
        "format_version": "1",
        "sample_rate": "24000",
        "frame_rate": "12.5",
        "num_codebooks": "8",
        "num_samples": "18000",
        "codec": CODEC,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def _write(path: Path, tensors: dict[str, torch.Tensor], **overrides: str | None) -> Path:
    save_file(tensors, str(path), metadata=_metadata(**overrides))
    return path


def test_round_trip_single_item(tmp_path: Path) -> None:
    codes = _codes(8, 10)
    tokens = MimiTokens(codes, [18000], CODEC)
    assert not tokens.batched
    assert tokens.codes.shape == (1, 8, 10) and tokens.codes.dtype == torch.int64
    assert (tokens.num_codebooks, tokens.num_frames, tokens.batch_size) == (8, 10, 1)

    path = tmp_path / "one.safetensors"
    save_tokens(path, tokens)
    with safe_open(str(path), "pt") as f:
        stored = f.get_tensor("codes")
        meta = f.metadata()
    assert stored.dtype == torch.int16 and stored.shape == (8, 10)
    assert meta == _metadata()

    back = load_tokens(path)
    assert torch.equal(back.codes, tokens.codes)
    assert back.num_samples == [18000]
    assert (back.codec, back.sample_rate, back.frame_rate) == (CODEC, 24000, 12.5)
    assert not back.batched
    assert [p.name for p in tmp_path.iterdir()] == ["one.safetensors"]  # no temporary file left


def test_round_trip_batch(tmp_path: Path) -> None:
    codes = _codes(3, 32, 5)
    codes[0, 0, 0], codes[1, 1, 1] = 0, 2047
    tokens = MimiTokens(codes, [7681, 9600, 8000], CODEC)
    assert tokens.batched
    path = tmp_path / "batch.safetensors"
    save_tokens(path, tokens)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("codes").shape == (3, 32, 5)
        assert f.metadata()["num_samples"] == "7681,9600,8000"
    back = load_tokens(path)
    assert torch.equal(back.codes, codes)
    assert back.num_samples == [7681, 9600, 8000]
    assert back.batched


def test_batch_of_one_stays_batched() -> None:
    tokens = MimiTokens(_codes(1, 8, 10), [18000], CODEC)
    back = load_tokens(tokens_to_bytes(tokens))
    assert back.batched and back.codes.shape == (1, 8, 10)


def test_bytes_round_trip_matches_file(tmp_path: Path) -> None:
    tokens = MimiTokens(_codes(8, 10).to(torch.int32), [18000], CODEC)
    data = tokens_to_bytes(tokens)
    back = load_tokens(data)
    assert torch.equal(back.codes, tokens.codes)
    assert back.num_samples == [18000] and not back.batched
    path = tmp_path / "t.safetensors"
    save_tokens(path, tokens)
    from_file = load_tokens(path)
    assert torch.equal(from_file.codes, back.codes) and from_file.num_samples == back.num_samples


def test_file_written_by_hand_loads(tmp_path: Path) -> None:
    codes = _codes(8, 10).to(torch.int16)
    tokens = load_tokens(_write(tmp_path / "t.safetensors", {"codes": codes}))
    assert torch.equal(tokens.codes[0], codes.long())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidTokenFileError, match="does not exist"):
        load_tokens(tmp_path / "nope.safetensors")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.touch()
    with pytest.raises(InvalidTokenFileError, match="is empty"):
        load_tokens(path)


@pytest.mark.parametrize(
    "content",
    [b"not a safetensors file at all", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", b"\x01"],
)
def test_not_safetensors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    expected = r"bad\.safetensors' is not a readable safetensors file"
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(path)
    expected = "token data is not a readable safetensors file"
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(content)


def test_missing_codes(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"tokens": _codes(8, 10)})
    with pytest.raises(InvalidTokenFileError, match="has no 'codes' tensor"):
        load_tokens(path)


def test_extra_tensors(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10), "extra": torch.zeros(2)})
    with pytest.raises(InvalidTokenFileError, match=re.escape("unexpected tensors ['extra']")):
        load_tokens(path)


def test_no_metadata(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"codes": _codes(8, 10)}, str(path))
    with pytest.raises(InvalidTokenFileError, match="not a Mimi token file: format is None"):
        load_tokens(path)


def test_wrong_format_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10)}, format="something-else")
    expected = "format is 'something-else', expected 'moshi-core.mimi-tokens'"
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(path)


@pytest.mark.parametrize("version", ["2", "0", None])
def test_unsupported_version(tmp_path: Path, version: str | None) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10)}, format_version=version)
    expected = f"format_version {version!r}; supported versions: 1"
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_codes_not_integer(tmp_path: Path, dtype: torch.dtype) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10).to(dtype)})
    with pytest.raises(InvalidTokenFileError, match="codes must be an integer tensor"):
        load_tokens(path)


@pytest.mark.parametrize("shape", [(80,), (1, 1, 8, 10)])
def test_wrong_rank(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10).reshape(shape)})
    expected = re.escape(f"shape [K, F] or [B, K, F], got {list(shape)}")
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(path)


def test_empty_batch(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(0, 8, 10)}, num_samples="")
    with pytest.raises(InvalidTokenFileError, match=r"empty batch \(B = 0\)"):
        load_tokens(path)


@pytest.mark.parametrize("k", [0, 33])
def test_codebooks_out_of_range(tmp_path: Path, k: int) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(k, 10)}, num_codebooks=str(k))
    expected = f"number of codebooks must be in 1..32, got {k}"
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(path)


def test_num_codebooks_metadata_disagrees(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10)}, num_codebooks="16")
    expected = "num_codebooks metadata is 16 but codes has 8 codebooks"
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(path)


def test_no_frames(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 0)}, num_samples="0")
    with pytest.raises(InvalidTokenFileError, match=r"no frames \(F = 0\)"):
        load_tokens(path)


@pytest.mark.parametrize(("value", "position"), [(2048, "[3, 7]"), (-1, "[3, 7]")])
def test_codes_out_of_range(tmp_path: Path, value: int, position: str) -> None:
    codes = _codes(8, 10).to(torch.int16)
    codes[3, 7] = value
    codes[5, 9] = 4000
    path = _write(tmp_path / "t.safetensors", {"codes": codes})
    expected = f"2 code(s) outside [0, 2048); the first is {value} at codes{position}"
    with pytest.raises(InvalidTokenFileError, match=re.escape(expected)):
        load_tokens(path)


def test_codes_out_of_range_batched_position(tmp_path: Path) -> None:
    codes = _codes(2, 8, 10)
    codes[1, 2, 3] = 9999
    path = _write(tmp_path / "t.safetensors", {"codes": codes}, num_samples="18000,18000")
    expected = re.escape("the first is 9999 at codes[1, 2, 3]")
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(path)


def test_missing_num_samples(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10)}, num_samples=None)
    with pytest.raises(InvalidTokenFileError, match="missing the 'num_samples' metadata"):
        load_tokens(path)


@pytest.mark.parametrize("text", ["18000.5", "abc", "18000,"])
def test_num_samples_not_integers(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10)}, num_samples=text)
    with pytest.raises(InvalidTokenFileError, match="metadata 'num_samples' must be an integer"):
        load_tokens(path)


@pytest.mark.parametrize(("text", "count"), [("18000,18000", 2), ("", 0)])
def test_num_samples_wrong_count(tmp_path: Path, text: str, count: int) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(3, 8, 10)}, num_samples=text)
    expected = rf"num_samples has {count} value\(s\) but the batch has 3 item\(s\)"
    with pytest.raises(InvalidTokenFileError, match=expected):
        load_tokens(path)


@pytest.mark.parametrize(("n", "expected"), [
    (17280, "num_samples (longest 17280) does not match 10 frame(s)"),
    (19201, "num_samples[0] = 19201 does not fit 10 frame(s)"),
    (0, "num_samples[0] = 0 does not fit 10 frame(s)"),
    (-5, "num_samples[0] = -5 does not fit 10 frame(s)"),
])
def test_num_samples_inconsistent_with_frames(tmp_path: Path, n: int, expected: str) -> None:
    # 10 frames cover 17281..19200 samples.
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10)}, num_samples=str(n))
    with pytest.raises(InvalidTokenFileError, match=re.escape(expected)):
        load_tokens(path)


def test_batch_items_may_be_shorter_than_the_longest(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(2, 8, 10)}, num_samples="500,19000")
    assert load_tokens(path).num_samples == [500, 19000]


@pytest.mark.parametrize("n", [17281, 19200])
def test_num_samples_bounds_accepted(tmp_path: Path, n: int) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10)}, num_samples=str(n))
    assert load_tokens(path).num_samples == [n]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sample_rate", "16000", "sample_rate must be 24000, got 16000"),
        ("sample_rate", "fast", "metadata 'sample_rate' must be an integer"),
        ("frame_rate", "25", "frame_rate must be 12.5, got 25.0"),
        ("frame_rate", "x", "metadata 'frame_rate' must be a number"),
        ("codec", "", "codec must be a non-empty string"),
        ("codec", None, "missing the 'codec' metadata"),
    ],
)
def test_bad_rates_and_codec(tmp_path: Path, key: str, value: str | None, message: str) -> None:
    path = _write(tmp_path / "t.safetensors", {"codes": _codes(8, 10)}, **{key: value})
    with pytest.raises(InvalidTokenFileError, match=re.escape(message)):
        load_tokens(path)


def test_construction_validates() -> None:
    with pytest.raises(InvalidTokenFileError, match="must be an integer tensor"):
        MimiTokens(torch.zeros(8, 10), [18000], CODEC)
    with pytest.raises(InvalidTokenFileError, match="outside"):
        MimiTokens(_codes(8, 10) + 2048, [18000], CODEC)
    with pytest.raises(InvalidTokenFileError, match="num_samples has 1 value"):
        MimiTokens(_codes(2, 8, 10), [18000], CODEC)
    with pytest.raises(InvalidTokenFileError, match="exactly one item"):
        MimiTokens(_codes(2, 8, 10), [18000, 18000], CODEC, batched=False)
    with pytest.raises(InvalidTokenFileError, match="frame_rate"):
        MimiTokens(_codes(8, 10), [18000], CODEC, frame_rate=25.0)


def test_save_refuses_tokens_changed_into_bad_ones(tmp_path: Path) -> None:
    tokens = MimiTokens(_codes(8, 10), [18000], CODEC)
    tokens.codes[0, 0, 0] = 5000  # the tensor itself stays mutable
    path = tmp_path / "t.safetensors"
    with pytest.raises(InvalidTokenFileError, match=re.escape("the first is 5000 at codes[0, 0]")):
        save_tokens(path, tokens)
    with pytest.raises(InvalidTokenFileError, match="outside"):
        tokens_to_bytes(tokens)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_extra_metadata_is_ignored() -> None:
    tokens = MimiTokens(_codes(8, 10), [18000], CODEC)
    metadata = {**_metadata(), "note": "hello"}
    data = save({"codes": tokens.codes[0].to(torch.int16)}, metadata=metadata)
    assert load_tokens(data).num_samples == [18000]

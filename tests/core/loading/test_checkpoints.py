"""Loading Mimi files: official keys, clear errors, local folders and the HF cache."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moshi_core.errors import CheckpointError, ModelSourceError
from moshi_core.loading.checkpoints import load_mimi
from moshi_core.loading.hub import parse_source

MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
REPO_DIR = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def official(mimi_checkpoint):
    return load_file(str(mimi_checkpoint))


def _write(tmp_path: Path, state: dict, name: str = MIMI_NAME) -> Path:
    save_file(state, str(tmp_path / name))
    return tmp_path / name


def test_folder_is_searched_for_known_names(tmp_path, mimi_checkpoint):
    shutil.copy(mimi_checkpoint, tmp_path / "mimi-pytorch-e351c8d8@125.safetensors")  # STT repos' name
    mimi = load_mimi(tmp_path)
    assert mimi.checkpoint_id == "mimi-pytorch-e351c8d8@125.safetensors"


def test_missing_tensor_is_named(tmp_path, official):
    state = dict(official)
    del state["decoder.model.14.conv.conv.bias"]
    with pytest.raises(CheckpointError, match=r"missing: decoder\.model\.14\.conv\.conv\.bias"):
        load_mimi(_write(tmp_path, state))


def test_unexpected_tensor_is_named(tmp_path, official):
    state = dict(official, **{"encoder.model.99.conv.conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected: encoder\.model\.99"):
        load_mimi(_write(tmp_path, state))


def test_misshapen_tensor_is_named_with_both_shapes(tmp_path, official):
    state = dict(official, **{"upsample.convtr.convtr.convtr.weight": torch.zeros(512, 512, 4)})
    with pytest.raises(CheckpointError, match=r"upsample\.convtr\.convtr\.convtr\.weight \[512, 512, 4\] \(expected \[512, 1, 4\]\)"):
        load_mimi(_write(tmp_path, state))


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / MIMI_NAME
    path.write_bytes(b"definitely not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_mimi(path)


def test_empty_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="holds none of"):
        load_mimi(tmp_path)


@pytest.mark.parametrize("text,expected", [
    ("kyutai/moshika-candle-q8", ("kyutai/moshika-candle-q8", None, None)),
    ("kyutai/moshika-candle-q8@abc123", ("kyutai/moshika-candle-q8", None, "abc123")),
    ("hf://kyutai/moshika-candle-q8/" + MIMI_NAME, ("kyutai/moshika-candle-q8", MIMI_NAME, None)),
    ("hf://kyutai/stt-1b-en_fr@v1/sub/dir/f.safetensors", ("kyutai/stt-1b-en_fr", "sub/dir/f.safetensors", "v1")),
])
def test_parse_source(text, expected):
    s = parse_source(text)
    assert (s.repo_id, s.filename, s.revision) == expected


@pytest.mark.parametrize("text", ["", "not-a-repo", "a/b/c", "hf://onlyowner", "./missing/file.safetensors"])
def test_bad_sources(text):
    with pytest.raises(ModelSourceError):
        parse_source(text)


def _hf_cache(root: Path, repo: str, commit: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache laid out as `huggingface_hub` writes it."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        os.symlink(source, snapshot / name)
    return root


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moshi_core", *args], cwd=REPO_DIR, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=300,
    )


def test_repo_id_resolves_from_the_hf_cache_offline(tmp_path, mimi_checkpoint, shared_audio):
    commit = "4b4a873" + "0" * 33
    cache = _hf_cache(tmp_path / "hub", "kyutai/moshika-candle-q8", commit, {MIMI_NAME: mimi_checkpoint})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    audio = str(shared_audio / "en_short_16k.wav")
    out = tmp_path / "tokens.safetensors"
    done = _cli("encode", audio, "-o", str(out), "--mimi", "kyutai/moshika-candle-q8", "-q", env=env)
    assert done.returncode == 0, done.stderr
    assert out.exists()
    # The other spellings resolve to the same cached file (one process: the Hub's settings
    # are read at import, and a model load per spelling would prove nothing more).
    probe = "import sys; from moshi_core.loading.hub import resolve_file; [print(resolve_file(s, [sys.argv[1]])) for s in sys.argv[2:]]"
    spellings = [f"kyutai/moshika-candle-q8@{commit}", f"hf://kyutai/moshika-candle-q8/{MIMI_NAME}"]
    done = subprocess.run([sys.executable, "-c", probe, MIMI_NAME, *spellings], cwd=REPO_DIR, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    snapshot = cache / "models--kyutai--moshika-candle-q8" / "snapshots" / commit / MIMI_NAME
    assert done.stdout.split() == [str(snapshot)] * 2
    # Not in the cache and offline: a message that says what to do, exit code 2.
    done = _cli("encode", audio, "-o", str(tmp_path / "x.safetensors"), "--mimi", "kyutai/moshiko-candle-q8", env=env)
    assert done.returncode == 2
    assert "not in the Hugging Face cache" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    assert "Traceback" not in done.stderr

"""Shared pytest fixtures. The tests mirror the source (core/<layer>/, workers/, api/, ui/,
packaging/); what several of them use (the reference oracle, tiny checkpoints, test servers)
is in support/, importable by its module name."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# The reference compiles a few of its functions with torch.compile on first use: tens of
# seconds per test process on 2 cores, for the same numbers as eager mode.
os.environ.setdefault("NO_TORCH_COMPILE", "1")


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    """Folder of the shared test speech files; MOSHI_SHARED_AUDIO overrides the default."""
    override = os.environ.get("MOSHI_SHARED_AUDIO")
    default = Path(__file__).resolve().parents[2] / "shared" / "audio"
    folder = Path(override) if override else default
    if not folder.is_dir():
        pytest.fail(f"shared test audio not found at {folder}; set MOSHI_SHARED_AUDIO")
    return folder


@pytest.fixture(scope="session")
def mimi_checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_audio: Path) -> Path:
    """A full-size Mimi with random weights, saved with the official key names."""
    from oracle import write_reference_mimi

    from moshi_core.formats.audio import load_audio

    path = tmp_path_factory.mktemp("mimi") / "tokenizer-e351c8d8-checkpoint125.safetensors"
    return write_reference_mimi(path, calibration=load_audio(shared_audio / "en_question_24k.wav")[None])


@pytest.fixture(scope="session")
def our_mimi(mimi_checkpoint: Path):
    from moshi_core.loading.checkpoints import load_mimi

    return load_mimi(mimi_checkpoint, num_codebooks=8)


@pytest.fixture(scope="session")
def ref_mimi(mimi_checkpoint: Path):
    from oracle import load_reference_mimi

    return load_reference_mimi(mimi_checkpoint)


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SentencePiece model with Moshi's special ids (unk 0, eos 2, pad 3)."""
    from oracle import write_test_tokenizer

    return write_test_tokenizer(tmp_path_factory.mktemp("spm") / "tokenizer_spm_test.model")


@pytest.fixture(scope="session")
def tiny_moshi(tmp_path_factory: pytest.TempPathFactory, mimi_checkpoint: Path, tokenizer_model: Path) -> Path:
    """A folder laid out like a Kyutai Moshi repo, with a 7B-shaped LM at a tiny size."""
    import json
    import shutil

    from oracle import REDUCED_7B, write_reference_lm

    folder = tmp_path_factory.mktemp("tiny-moshi")
    config = dict(REDUCED_7B, text_card=64, card=2048, tokenizer_name="tokenizer_spm_test.model",
                  lm_gen_config={"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25})
    (folder / "config.json").write_text(json.dumps(config))
    write_reference_lm(folder / "model.safetensors", {k: v for k, v in config.items()
                                                      if k not in ("tokenizer_name", "lm_gen_config")})
    os.symlink(mimi_checkpoint, folder / "tokenizer-e351c8d8-checkpoint125.safetensors")
    shutil.copy(tokenizer_model, folder / "tokenizer_spm_test.model")
    return folder


@pytest.fixture(scope="session")
def tiny_models(tiny_moshi: Path):
    """The tiny Moshi loaded once, in float32 on the CPU. Engines and servers only read the models
    (a server's conversations share one load the same way), so every test module may share it."""
    import torch

    from moshi_core.loading.registry import load_moshi

    return load_moshi(tiny_moshi, device="cpu", dtype=torch.float32)

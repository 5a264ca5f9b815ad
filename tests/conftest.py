"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


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
    from moshi_core.audio import load_audio
    from oracle import write_reference_mimi

    path = tmp_path_factory.mktemp("mimi") / "tokenizer-e351c8d8-checkpoint125.safetensors"
    return write_reference_mimi(path, calibration=load_audio(shared_audio / "en_question_24k.wav")[None])


@pytest.fixture(scope="session")
def our_mimi(mimi_checkpoint: Path):
    from moshi_core.checkpoints import load_mimi

    return load_mimi(mimi_checkpoint, num_codebooks=8)


@pytest.fixture(scope="session")
def ref_mimi(mimi_checkpoint: Path):
    from oracle import load_reference_mimi

    return load_reference_mimi(mimi_checkpoint)

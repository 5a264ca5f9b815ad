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

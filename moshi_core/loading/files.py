"""A model's files by name, in a Hub repo or a local folder: its config.json, a safetensors file.

Nothing here builds a model, so a process that only checks requests (the API) can read a
config without importing the model code.
"""

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moshi_core.errors import CheckpointError, ModelSourceError
from moshi_core.loading.hub import ModelSource, resolve_file


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def file_in(source: ModelSource, names: str | tuple[str, ...], revision: str | None) -> Path:
    """A file named in a config (an hf:// URI of its own, or a file of the model's repo or
    folder), or the first of several default names that exists."""
    names = (names,) if isinstance(names, str) else names
    if len(names) == 1 and names[0].startswith("hf://"):
        return resolve_file(names[0], [], revision)
    if source.local is not None:
        for name in names:
            if (source.local / name).is_file():
                return source.local / name
        raise ModelSourceError(f"{source.local} has no {' or '.join(names)}")
    if len(names) == 1:
        return resolve_file(f"hf://{source.repo_id}/{names[0]}", [], source.revision or revision)
    return resolve_file(source.repo_id, names, source.revision or revision)


def read_config(source: ModelSource, revision: str | None) -> dict[str, Any]:
    """A model's config.json ({} for a folder or repo that has none)."""
    if source.local is not None:
        path = source.local / "config.json"
        if not path.is_file():
            return {}
    else:
        try:
            path = resolve_file(f"hf://{source.repo_id}/config.json", [], source.revision or revision)
        except ModelSourceError as exc:
            if "has none of" in str(exc):  # the repo exists but ships no config.json
                return {}
            raise
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON config: {exc}") from exc

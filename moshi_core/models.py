"""Model registry: resolve a Moshi model source into its LM, Mimi and text tokenizer.

A source is a Hub repo laid out like Kyutai's (`kyutai/moshika-pytorch-bf16`), an `hf://`
URI of such a repo, or a local folder with the same files. `config.json`, when present,
gives the LM config and the file names (`moshi_name`, `mimi_name`, `tokenizer_name`, which
may themselves be `hf://` URIs); without it the Moshi 7B preset and Kyutai's file names
apply, as in Kyutai's loader.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_lm, load_mimi
from .errors import CheckpointError, ModelSourceError
from .hub import ModelSource, parse_source, resolve_file
from .lm import MOSHI_7B, LMConfig, LMModel
from .mimi import MimiModel
from .text import TextTokenizer

DEFAULT_LM_SOURCE = "kyutai/moshika-candle-q8"
SUPPORTED_MODELS = {
    "kyutai/moshika-pytorch-bf16": "Moshi, female voice, bfloat16 (15.4 GB)",
    "kyutai/moshiko-pytorch-bf16": "Moshi, male voice, bfloat16 (15.4 GB)",
    "kyutai/moshika-candle-q8": "Moshi, female voice, 8-bit GGUF, kept int8 (8.2 GB)",
    "kyutai/moshiko-candle-q8": "Moshi, male voice, 8-bit GGUF, kept int8 (8.2 GB)",
    "kyutai/moshika-candle-bf16": "Moshi, female voice, Candle bfloat16",
    "kyutai/moshiko-candle-bf16": "Moshi, male voice, Candle bfloat16",
    "kyutai/moshika-pytorch-q8": "Moshi, female voice, row-wise int8 (bitsandbytes layout)",
    "kyutai/moshiko-pytorch-q8": "Moshi, male voice, row-wise int8 (bitsandbytes layout)",
}
LM_FILENAMES = ("model.q8.gguf", "model.safetensors", "model.q8.safetensors")
TOKENIZER_FILENAME = "tokenizer_spm_32k_3.model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MoshiModels:
    """What a dialogue needs, loaded once and shared by every conversation."""

    lm: LMModel
    mimi: MimiModel
    tokenizer: TextTokenizer
    source: str
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # `lm_gen_config`
    config: dict[str, Any] = field(default_factory=dict)  # the whole config.json ({} without one)


def _file_in(source: ModelSource, names: str | tuple[str, ...], revision: str | None) -> Path:
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


def _read_config(source: ModelSource, revision: str | None) -> dict[str, Any]:
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


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelSourceError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_moshi(
    source: str | os.PathLike = DEFAULT_LM_SOURCE,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    revision: str | None = None,
) -> MoshiModels:
    parsed = parse_source(source, revision)
    if parsed.local is not None and parsed.local.is_file():
        raise ModelSourceError(f"{parsed.local} is a file: give the folder that holds the model's files")
    config = _read_config(parsed, revision)
    try:
        lm_config = LMConfig.from_dict(config or MOSHI_7B)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the config.json of {source} does not describe a supported LM: {exc}") from exc
    lm_path = _file_in(parsed, config.get("moshi_name", LM_FILENAMES), revision)
    lm = load_lm(lm_path, lm_config, dtype=dtype, device=device)
    mimi_name = config.get("mimi_name")
    if mimi_name:
        mimi_source = str(_file_in(parsed, mimi_name, revision))
    elif parsed.local is not None:
        mimi_source = str(parsed.local)  # searched for the known Mimi file names
    else:
        mimi_source = parsed.repo_id + (f"@{parsed.revision}" if parsed.revision else "")
    # Kyutai's rule: as many codebooks as the model reads or writes, whichever is more.
    codebooks = max(lm_config.dep_q, lm_config.n_q - lm_config.dep_q)
    mimi = load_mimi(mimi_source, device=device, num_codebooks=codebooks)
    if lm_config.card != mimi.cfg.quantizer.bins:
        raise CheckpointError(f"the LM of {source} has {lm_config.card} audio tokens but Mimi has "
                              f"{mimi.cfg.quantizer.bins}: they do not belong together")
    tokenizer = TextTokenizer(_file_in(parsed, config.get("tokenizer_name", TOKENIZER_FILENAME), revision))
    return MoshiModels(lm, mimi, tokenizer, str(source), dict(config.get("lm_gen_config") or {}), config)



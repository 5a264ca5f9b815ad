"""Model registry: resolve a Moshi model source into its LM, Mimi and text tokenizer.

A source is a Hub repo laid out like Kyutai's (`kyutai/moshika-pytorch-bf16`), an `hf://`
URI of such a repo, or a local folder with the same files. `config.json`, when present,
gives the LM config and the file names (`moshi_name`, `mimi_name`, `tokenizer_name`, which
may themselves be `hf://` URIs); without it the Moshi 7B preset and Kyutai's file names
apply, as in Kyutai's loader. `quantize="q8"` turns a float LM into Q8_0 as it loads
(`moshi_core.loading.checkpoints.load_lm`); Mimi always stays float32.
"""

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from moshi_core.errors import CheckpointError, ModelSourceError
from moshi_core.formats.text import TextTokenizer
from moshi_core.loading.catalog import DEFAULT_LM_SOURCE
from moshi_core.loading.checkpoints import load_lm, load_mimi, wants_q8
from moshi_core.loading.files import file_in, read_config
from moshi_core.loading.hub import parse_source
from moshi_core.models.lm import MOSHI_7B, LMConfig, LMModel
from moshi_core.models.mimi import MimiModel
from moshi_core.params import GpuStep, compile_mode

LM_FILENAMES = ("model.q8.gguf", "model.safetensors", "model.q8.safetensors")
TOKENIZER_FILENAME = "tokenizer_spm_32k_3.model"


@dataclass
class MoshiModels:
    """What a dialogue needs, loaded once and shared by every conversation."""

    lm: LMModel
    mimi: MimiModel
    tokenizer: TextTokenizer
    source: str
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # `lm_gen_config`
    config: dict[str, Any] = field(default_factory=dict)  # the whole config.json ({} without one)
    gpu_step: GpuStep = "eager"  # how the engines' LM and Mimi steps run on CUDA (`LMGenerator`, `compile_steps`)

    @property
    def compiles(self) -> bool:
        """Whether the engines' LM steps are compiled (CUDA and not eager): they warm up when built."""
        return self.lm.device.type == "cuda" and self.gpu_step != "eager"


def load_moshi(
    source: str | os.PathLike = DEFAULT_LM_SOURCE,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    revision: str | None = None,
    gpu_step: GpuStep = "cuda-graphs",
    quantize: str | None = None,
) -> MoshiModels:
    """`gpu_step`: how the engines step the models on CUDA (no effect on a CPU). The front
    doors choose it from Kyutai's switches (NO_CUDA_GRAPH, NO_TORCH_COMPILE)."""
    wants_q8(quantize)  # a bad value fails before any download
    parsed = parse_source(source, revision)
    if parsed.local is not None and parsed.local.is_file():
        raise ModelSourceError(f"{parsed.local} is a file: give the folder that holds the model's files")
    config = read_config(parsed, revision)
    try:
        lm_config = LMConfig.from_dict(config or MOSHI_7B)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the config.json of {source} does not describe a supported LM: {exc}") from exc
    lm_path = file_in(parsed, config.get("moshi_name", LM_FILENAMES), revision)
    lm = load_lm(lm_path, lm_config, dtype=dtype, device=device, quantize=quantize)
    mimi_name = config.get("mimi_name")
    if mimi_name:
        mimi_source = str(file_in(parsed, mimi_name, revision))
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
    tokenizer = TextTokenizer(file_in(parsed, config.get("tokenizer_name", TOKENIZER_FILENAME), revision))
    if mimi.device.type == "cuda" and gpu_step != "eager":  # the engines' lockstep Mimi steps, like the LM's
        mimi.compile_steps(mode=compile_mode(gpu_step))
    return MoshiModels(lm, mimi, tokenizer, str(source), dict(config.get("lm_gen_config") or {}), config, gpu_step)



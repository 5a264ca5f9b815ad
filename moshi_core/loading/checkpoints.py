"""Loading Kyutai's released checkpoints into our modules, keys unchanged.

The model is built on the `meta` device, then given fresh storage and filled from the file
(8-bit matrices become 8-bit weights instead, see `moshi_core.kernels.q8`).
Copying (instead of assigning the file's tensors) costs one pass over the weights but gives
64-byte aligned buffers, which the CPU matrix kernels read measurably faster.
"""

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from moshi_core.errors import CheckpointError
from moshi_core.kernels import build as cpu_kernels
from moshi_core.loading.files import read_safetensors
from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE, MIMI_FILENAMES, resolve_file
from moshi_core.models.mimi import MimiConfig, MimiModel

if TYPE_CHECKING:
    from moshi_core.models.lm import LMConfig, LMModel


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshapen tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{k} {list(state[k].shape)} (expected {list(expected[k])})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrongly shaped", misshapen)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{name} does not match the model: " + "; ".join(problems))


def materialize(model: nn.Module, state: dict, name: str, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Fill a meta-device `model` from `state`, strictly; 8-bit tensors become 8-bit weights."""
    from moshi_core.kernels.q8 import attach_int8_weights

    check_state_dict(model, state, name)
    rest = attach_int8_weights(model, state, dtype, device)
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(rest, strict=True)
    if torch.device(device).type == "cpu" and cpu_kernels.ENABLED:
        cpu_kernels.kernels()  # built (or found in the cache) while loading, not in the first step
    return model.eval().requires_grad_(False)


def load_mimi(
    source: str | os.PathLike = DEFAULT_MIMI_SOURCE,
    *,
    device: torch.device | str = "cpu",
    num_codebooks: int = 8,
    revision: str | None = None,
    config: MimiConfig | None = None,
) -> MimiModel:
    """Mimi from a checkpoint source (see `moshi_core.loading.hub`), in float32 as Kyutai runs it."""
    path = resolve_file(source, MIMI_FILENAMES, revision)
    with torch.device("meta"):
        model = MimiModel(config or MimiConfig(num_codebooks=num_codebooks))
    model = materialize(model, read_safetensors(path), path.name, torch.float32, device)
    model.num_codebooks = num_codebooks
    model.checkpoint_id = checkpoint_id(source, path)
    return model


def checkpoint_id(source: str | os.PathLike, path: Path) -> str:
    """A stable name for the weights, stored in token files: repo/file for Hub sources."""
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return path.name
    repo = text.removeprefix("hf://").split("/")
    return f"{repo[0]}/{repo[1].split('@')[0]}/{path.name}"


def load_lm(
    path: str | os.PathLike,
    config: "LMConfig",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    dequantize: bool = False,
) -> "LMModel":
    """The Moshi LM from Kyutai's `model.safetensors` (PyTorch or Candle names), Candle
    `model.q8.gguf` or PyTorch `model.q8.safetensors`, computing in `dtype`.

    8-bit matrices stay int8 in memory (see `moshi_core.kernels.q8`); with `dequantize` they are
    dequantized and held in `dtype` instead, like any float checkpoint.
    """
    from moshi_core.kernels.q8 import join_row_scales
    from moshi_core.loading.gguf import candle_to_ours, is_candle_layout, read_gguf
    from moshi_core.models.lm import LMModel

    path = Path(path)
    with torch.device("meta"):
        model = LMModel(config)
    if path.suffix == ".gguf":
        state = candle_to_ours(read_gguf(path), config.dep_q, path.name)
    else:
        state = read_safetensors(path)
        if is_candle_layout(state):  # `*-candle-bf16` repos: Candle names in a safetensors file
            state = candle_to_ours(state, config.dep_q, path.name)
        state = join_row_scales(state)  # `*-pytorch-q8` repos: int8 weights with `_scb` scales
    if dequantize:
        state = {k: v.dequantize() if hasattr(v, "dequantize") else v for k, v in state.items()}
    model = materialize(model, state, path.name, dtype, device)
    if model.condition_provider is not None:  # kept float32 whatever `dtype`, as Kyutai's loader does
        prefix = "condition_provider."
        conditions = {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
        model.condition_provider.float().load_state_dict(conditions, strict=True)
    return model

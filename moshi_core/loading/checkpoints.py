"""Loading Kyutai's released checkpoints into our modules, keys unchanged.

The model is built on the `meta` device, then given fresh storage and filled from the file
(8-bit matrices become 8-bit weights instead, see `moshi_core.kernels.q8`). With
`quantize="q8"` a float LM checkpoint becomes Q8_0 as it is read, tensor by tensor, so its
float weights are never all in memory (`read_safetensors_as_q8`).
Copying (instead of assigning the file's tensors) costs one pass over the weights but gives
64-byte aligned buffers, which the CPU matrix kernels read measurably faster.
"""

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from safetensors import SafetensorError, safe_open

from moshi_core.errors import CheckpointError, InvalidParameterError
from moshi_core.kernels import build as cpu_kernels
from moshi_core.loading.files import read_safetensors
from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE, MIMI_FILENAMES, resolve_file
from moshi_core.models.mimi import MimiConfig, MimiModel
from moshi_core.params import QUANTIZE_MODES

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


def wants_q8(quantize: str | None) -> bool:
    """True for "q8"; False for None or "none"; InvalidParameterError for anything else."""
    if quantize not in (None, *QUANTIZE_MODES):
        raise InvalidParameterError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, not {quantize!r}")
    return quantize == "q8"


# Kept float32 whatever the dtype (see `load_lm`), and tiny: never quantized.
_FLOAT_ONLY_PREFIX = "condition_provider."


def read_safetensors_as_q8(path: str | os.PathLike) -> dict:
    """A float LM checkpoint with every matrix that Candle's q8 GGUF holds in Q8_0
    (`is_q8_matrix`: embeddings and linear layers) quantized as it is read; norms, biases,
    matrices whose rows are not whole blocks of 32, and conditioners stay as they are.

    Each tensor is read into memory of its own (`pread`, not a map of the whole file), and
    dropped once quantized, so at most one float tensor is held at a time. A file that
    already holds 8-bit weights (bitsandbytes' `_scb` scales) is read unchanged.
    """
    from moshi_core.kernels.quantize import is_q8_matrix, quantize_q8_0

    try:
        with safe_open(os.fspath(path), framework="pt", backend="pread") as f:
            names = list(f.keys())
            already_8bit = any(name.endswith("_scb") for name in names)
            state = {}
            for name in names:
                tensor = f.get_tensor(name)
                if not already_8bit and is_q8_matrix(tensor) and not name.startswith(_FLOAT_ONLY_PREFIX):
                    tensor = quantize_q8_0(tensor)
                state[name] = tensor
            return state
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_lm(
    path: str | os.PathLike,
    config: "LMConfig",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    dequantize: bool = False,
    quantize: str | None = None,
) -> "LMModel":
    """The Moshi LM from Kyutai's `model.safetensors` (PyTorch or Candle names), Candle
    `model.q8.gguf` or PyTorch `model.q8.safetensors`, computing in `dtype`.

    8-bit matrices stay int8 in memory (see `moshi_core.kernels.q8`); with `dequantize` they are
    dequantized and held in `dtype` instead, like any float checkpoint. `quantize="q8"` makes
    a float checkpoint's matrices Q8_0 as they load, the ones and the values Candle's
    `model.q8.gguf` would hold; on an 8-bit checkpoint it changes nothing.
    """
    from moshi_core.kernels.q8 import join_row_scales
    from moshi_core.loading.gguf import candle_to_ours, is_candle_layout, read_gguf
    from moshi_core.models.lm import LMModel

    q8 = wants_q8(quantize)
    path = Path(path)
    with torch.device("meta"):
        model = LMModel(config)
    if path.suffix == ".gguf":
        state = candle_to_ours(read_gguf(path), config.dep_q, path.name)
    else:
        state = read_safetensors_as_q8(path) if q8 else read_safetensors(path)
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

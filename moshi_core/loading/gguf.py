"""Kyutai's Candle checkpoints in GGUF (`kyutai/moshika-candle-q8`, `model.q8.gguf`).

Tensors are read with the `gguf` package: Q8_0 (blocks of 32 int8 with one float16 scale,
along the input dimension), F16 and F32. Names follow Candle's layout, which equals the
PyTorch checkpoint's except for the depth transformer, split into one "slice" per codebook
(`depformer.{s}.…`); the slices are joined back into our layout here.
"""

import os
import re

import numpy as np
import torch

from moshi_core.errors import CheckpointError
from moshi_core.kernels.q8 import Q8_BLOCK, Q8Tensor

Q8_BLOCK_BYTES = 2 + Q8_BLOCK  # float16 scale, then 32 int8


GGUFTensor = torch.Tensor | Q8Tensor


def _q8_from_blocks(raw: np.ndarray, shape: list[int]) -> Q8Tensor:
    rows, cols = shape
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // Q8_BLOCK, Q8_BLOCK_BYTES)
    scales = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
    qs = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows, cols)
    return Q8Tensor(qs, scales)


def read_gguf(path: str | os.PathLike) -> dict[str, GGUFTensor]:
    """Every tensor of a GGUF file by name: Q8_0 as `Q8Tensor`, F16/F32 as tensors."""
    import gguf

    try:
        reader = gguf.GGUFReader(os.fspath(path))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file: {exc}") from exc
    types = gguf.GGMLQuantizationType
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists the innermost dimension first
        if t.tensor_type == types.Q8_0:
            if len(shape) != 2:
                raise CheckpointError(f"{path}: Q8_0 tensor {t.name} has {len(shape)} dimensions, expected 2")
            tensors[t.name] = _q8_from_blocks(t.data, shape)
        elif t.tensor_type in (types.F32, types.F16):
            tensors[t.name] = torch.from_numpy(np.array(t.data)).reshape(shape)
        else:
            raise CheckpointError(
                f"{path}: tensor {t.name} has GGML type {t.tensor_type.name}; only Q8_0, F16 and F32 are supported"
            )
    return tensors


_SLICE = re.compile(r"depformer\.(\d+)\.(.+)")


def is_candle_layout(state: dict) -> bool:
    return "depformer.0.linear_in.weight" in state


def candle_to_ours(tensors: dict[str, GGUFTensor], dep_q: int, source: str) -> dict[str, GGUFTensor]:
    """Rename Candle's tensors to our module names, joining the depth transformer's slices."""
    state: dict[str, GGUFTensor] = {}
    per_slot: dict[str, dict[int, GGUFTensor]] = {}
    for name, value in tensors.items():
        match = _SLICE.fullmatch(name)
        if match is None:
            state[name] = value
            continue
        slot, rest = int(match.group(1)), match.group(2)
        if rest == "linear_in.weight":
            state[f"depformer_in.{slot}.weight"] = value
        elif rest == "linear_out.weight":
            state[f"linears.{slot}.weight"] = value
        elif rest == "emb.weight":
            state["depformer_text_emb.weight" if slot == 0 else f"depformer_emb.{slot - 1}.weight"] = value
        elif rest.startswith("transformer.layers.") and ".gating." in rest:
            layer, tail = rest.removeprefix("transformer.layers.").split(".gating.")
            state[f"depformer.layers.{layer}.gating.{slot}.{tail}"] = value
        elif rest.startswith("transformer."):
            per_slot.setdefault("depformer." + rest.removeprefix("transformer."), {})[slot] = value
        else:
            state[name] = value  # unknown: reported by the state check
    for name, slots in per_slot.items():
        if sorted(slots) != list(range(dep_q)):
            raise CheckpointError(f"{source}: {name} has depformer slices {sorted(slots)}, expected 0..{dep_q - 1}")
        parts = [slots[s] for s in range(dep_q)]
        if name.endswith("alpha"):  # norms are shared by the slots; Candle stores one copy per slice
            first = parts[0]
            if any(not torch.equal(p, first) for p in parts[1:]):
                raise CheckpointError(f"{source}: the {dep_q} slices of {name} differ; they must be copies")
            state[name] = first
        elif all(isinstance(p, Q8Tensor) for p in parts):
            state[name] = Q8Tensor.cat(parts)
        else:
            state[name] = torch.cat([p.dequantize() if isinstance(p, Q8Tensor) else p for p in parts])
    return state

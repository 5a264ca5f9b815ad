"""Where and in what precision models run: a device name or dtype name checked against this machine."""

import torch

from moshi_core.errors import InvalidParameterError, ModelSourceError
from moshi_core.params import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(name: str | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or None (CUDA when available), checked against this machine."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidParameterError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("CUDA is not available on this machine (no GPU or a CPU-only PyTorch): use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InvalidParameterError(f"device {name!r} is not supported: use cpu or cuda")
    return device


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelSourceError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]

"""`linear(x, weight)`: the matrix product every model layer uses, routed to the fastest kernel.

- 8-bit weights (`moshi_core.q8`) run their own kernels.
- On CPUs, products with few activation rows (a streaming step: one row per conversation)
  run our skinny kernel (`csrc/linear.cpp`): each weight is read once for all rows, at
  memory speed, where PyTorch packs the weight matrix for every call of more than one row
  and converts bfloat16 through a slow path.
- Everything else (GPUs, offline passes over whole files) is `F.linear`.

`Linear` is `nn.Linear` with that routing, so checkpoints load unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import kernel_for

# Up to this many activation rows the skinny kernel beats PyTorch's GEMM on CPU (measured:
# bench/kernels_bench.py); beyond, the GEMM's blocking pays.
SKINNY_MAX_ROWS = 8
_SKINNY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [O, K]ᵀ (+ bias) -> [..., O], in x's dtype."""
    from .q8 import QuantizedWeight

    if isinstance(weight, QuantizedWeight):
        return weight(x, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (0 < rows <= SKINNY_MAX_ROWS and weight.dtype in _SKINNY_DTYPES and x.dtype in _SKINNY_DTYPES
            and weight.shape[1] % 8 == 0 and weight.is_contiguous() and not _needs_grad(x, weight, bias)):
        kernel = kernel_for("linear", x)
        if kernel is not None:
            y = kernel.skinny_linear(x.reshape(rows, -1), weight, bias)
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """The kernels have no backward: training goes through `F.linear`."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

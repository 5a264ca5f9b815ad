"""`linear(x, weight)`: the matrix product every model layer uses, routed to the fastest kernel.

- 8-bit weights (`moshi_core.kernels.q8`) run their own kernels.
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

from moshi_core.kernels.build import kernel_for
from moshi_core.kernels.q8 import QuantizedWeight

# Up to this many activation rows the skinny kernel beats PyTorch's GEMM on CPU (measured on a
# 2-core AMD EPYC: 1.3-4x faster at 4-16 rows, even at 24-32, behind at 96); beyond, the GEMM pays.
SKINNY_MAX_ROWS = 16
_SKINNY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [O, K]ᵀ (+ bias) -> [..., O], in x's dtype."""
    if isinstance(weight, QuantizedWeight):
        return weight(x, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kernel = skinny_kernel(x, rows)
    if (kernel is not None and weight.dtype in _SKINNY_DTYPES and weight.shape[1] % 8 == 0
            and weight.is_contiguous() and not _needs_grad(x, weight, bias)):
        y = kernel.skinny_linear(x.reshape(rows, -1), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def skinny_kernel(x: torch.Tensor, rows: int):
    """The skinny kernel where a product of `rows` rows of x would take it (weights permitting), else None."""
    if not 0 < rows <= SKINNY_MAX_ROWS or x.dtype not in _SKINNY_DTYPES:
        return None
    return kernel_for(x)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """The kernels have no backward: training goes through `F.linear`."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

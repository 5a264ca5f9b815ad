"""Float matrices -> GGUF Q8_0, with the values llama.cpp and Candle would write for them.

The rule is ggml's `quantize_row_q8_0_ref` (Candle's `BlockQ8_0::from_float` is the same),
per block of 32 values along the input dimension, all in float32:

    amax = max |x|;  d = amax / 127;  id = 1 / d (0 when d == 0);  q = roundf(x * id)

`roundf` rounds halves away from zero (torch.round would round them to even), `q` is
computed from the float32 `d` and not from the stored scale, and the scale is stored as
float16(d), rounded to nearest even. Bfloat16 and float16 inputs go to float32 first,
exactly, as Candle's tensor-tools does. Which tensors Candle quantizes: `is_q8_matrix`.
On a CPU with our kernels the conversion runs there (`csrc/linear.cpp`, at memory speed),
elsewhere in PyTorch, a slab of rows at a time: the same bits.
"""

import torch

from moshi_core.kernels.build import kernel_for
from moshi_core.kernels.q8 import Q8_BLOCK, Q8Tensor

_SLAB_VALUES = 1 << 18  # converted at a time: a few float32 temporaries of 1 MB, reused


def is_q8_matrix(tensor: torch.Tensor) -> bool:
    """Candle's `tensor-tools quantize --quantization q8_0` rule: a float tensor of rank 2
    whose rows are whole blocks becomes Q8_0; anything else stays float."""
    return tensor.is_floating_point() and tensor.dim() == 2 and tensor.shape[1] % Q8_BLOCK == 0


def _quantize_slab(rows: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor) -> None:
    """Rows [R, in] into qs [R, in] and scales [R, in / 32], in place where it can: a slab
    of a few hundred thousand values keeps the temporaries few and small."""
    v = rows.to(torch.float32, copy=True).reshape(rows.shape[0], -1, Q8_BLOCK)  # [R, in / 32, 32], ours to change
    a = v.abs()
    d = a.amax(dim=-1, keepdim=True) / 127
    v.mul_(torch.where(d == 0, 0.0, 1 / d))  # x * id
    # roundf: halves away from zero (torch.round rounds them to even); |v| - floor|v| is exact.
    torch.abs(v, out=a)
    whole = a.floor()
    whole.add_(a.sub_(whole) >= 0.5).copysign_(v)
    qs.copy_(whole.view(qs.shape))
    scales.copy_(d[..., 0])


def quantize_q8_0(weight: torch.Tensor) -> Q8Tensor:
    """A float matrix [out, in] (in a multiple of 32) as Q8_0, on the matrix's device; no
    float32 copy of a large matrix is ever made."""
    if not is_q8_matrix(weight):
        raise ValueError(f"Q8_0 needs a float matrix whose rows are multiples of {Q8_BLOCK}, not {list(weight.shape)}")
    kernel = kernel_for(weight)
    if kernel is not None:
        return Q8Tensor(*kernel.quantize_q8_0(weight))
    rows, cols = weight.shape
    qs = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, cols // Q8_BLOCK, dtype=torch.float16, device=weight.device)
    step = max(1, _SLAB_VALUES // cols)
    for i in range(0, rows, step):
        _quantize_slab(weight[i : i + step], qs[i : i + step], scales[i : i + step])
    return Q8Tensor(qs, scales)

"""Q8_0 weights kept int8 in memory, with a CPU matrix-vector kernel that reads them as int8.

Q8_0 (GGUF's 8-bit format) stores a matrix [out, in] as int8 values with one float16 scale
per block of 32 along `in`. Stock PyTorch has no matmul for per-block scales: its int8
weight-only op takes one scale per row, and requantizing to that would change the weights.
So a small C++ kernel (compiled on first use with `torch.utils.cpp_extension`, cached
afterwards) computes y = x W^T block by block from the int8 values; where it cannot be
built, or on GPUs, the weights are dequantized a slab of rows at a time instead.

A `Q8Weight` stands where a layer's float weight was. It implements `__torch_function__`,
so `F.linear` and `F.embedding` on it reach the kernel while the model code stays unchanged.
"""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Q8_BLOCK = 32
log = logging.getLogger(__name__)


@dataclass
class Q8Tensor:
    """A Q8_0 matrix [out, in]: int8 values and one float16 scale per 32 along `in`."""

    qs: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float16 [out, in / 32]

    @property
    def shape(self) -> torch.Size:
        return self.qs.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Exact in float32: int8 x float16 products fit float32's mantissa."""
        return _dequantize_rows(self.qs, self.scales).to(dtype)

    @staticmethod
    def cat(parts: list["Q8Tensor"]) -> "Q8Tensor":
        return Q8Tensor(torch.cat([p.qs for p in parts]), torch.cat([p.scales for p in parts]))


def _dequantize_rows(qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    *lead, cols = qs.shape
    blocks = qs.reshape(*lead, cols // Q8_BLOCK, Q8_BLOCK).float() * scales.float()[..., None]
    return blocks.reshape(*lead, cols)


class Q8Weight(Q8Tensor):
    """A Q8_0 weight in place of a float parameter; computes in `dtype`."""

    def __init__(self, qs: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__(qs, scales)
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.qs.device

    def new_zeros(self, *shape, **kwargs) -> torch.Tensor:
        kwargs.setdefault("dtype", self.dtype)
        kwargs.setdefault("device", self.device)
        return torch.zeros(*shape, **kwargs)

    def __getitem__(self, rows: slice) -> "Q8Weight":
        if not isinstance(rows, slice):
            raise TypeError("a Q8 weight can only be sliced by rows")
        return Q8Weight(self.qs[rows], self.scales[rows], self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return q8_linear(*args, **kwargs)
        if func is F.embedding:
            tokens, weight = args[0], args[1]
            return _dequantize_rows(weight.qs[tokens], weight.scales[tokens]).to(weight.dtype)
        raise TypeError(f"{func.__name__} is not supported on Q8 weights")


def q8_linear(x: torch.Tensor, weight: Q8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight.T [+ bias] -> [..., out], in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    kernel = _cpu_kernel() if x.device.type == "cpu" else None
    if kernel is not None:
        y = kernel.q8_matmul(x2, weight.qs, weight.scales).to(x.dtype)
    else:
        y = _slab_matmul(x2, weight)
    if bias is not None:
        y = y + bias
    return y.view(*lead, -1)


def _slab_matmul(x: torch.Tensor, weight: Q8Weight, slab: int = 1024) -> torch.Tensor:
    """Fallback: dequantize `slab` rows at a time, so no full float copy is ever made."""
    parts = [
        F.linear(x, _dequantize_rows(weight.qs[i : i + slab], weight.scales[i : i + slab]).to(x.dtype))
        for i in range(0, weight.qs.shape[0], slab)
    ]
    return torch.cat(parts, dim=-1)


_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y[m, o] = sum_b scale[o, b] * sum_j q[o, 32 b + j] * x[m, 32 b + j], in float32.
torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  auto xf = x.contiguous().to(torch::kFloat32);
  const int64_t M = xf.size(0), K = xf.size(1), O = q.size(0), NB = K / 32;
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous(), "Q8 weights must be contiguous");
  TORCH_CHECK(q.size(1) == K && K % 32 == 0, "Q8 matmul: shapes do not match");
  auto y = torch::empty({M, O}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, O, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int8_t* row = qp + o * K;
      const at::Half* srow = sp + o * NB;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t b = 0; b < NB; ++b) {
          const int8_t* blk = row + b * 32;
          __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)blk)));
          __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 16))));
          __m512 s = _mm512_set1_ps(static_cast<float>(srow[b]));
          acc0 = _mm512_fmadd_ps(_mm512_mul_ps(w0, s), _mm512_loadu_ps(xr + b * 32), acc0);
          acc1 = _mm512_fmadd_ps(_mm512_mul_ps(w1, s), _mm512_loadu_ps(xr + b * 32 + 16), acc1);
        }
        yp[m * O + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
      }
    }
  });
  return y;
}
"""

_kernel_state: dict[str, object] = {}


def _cpu_kernel():
    """The compiled kernel, or None (no compiler, no AVX-512): then the slab fallback runs."""
    if "kernel" not in _kernel_state:
        _kernel_state["kernel"] = None
        try:
            if "avx512f" not in open("/proc/cpuinfo").read():
                raise RuntimeError("this CPU has no AVX-512")
            from torch.utils.cpp_extension import load_inline

            _kernel_state["kernel"] = load_inline(
                "moshi_core_q8", cpp_sources=_KERNEL_SOURCE, functions=["q8_matmul"],
                extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl"], verbose=False,
            )
        except Exception as exc:  # any build problem means: use the portable path
            log.warning("Q8 CPU kernel unavailable (%s); dequantizing slabs of rows instead", exc)
    return _kernel_state["kernel"]


def attach_q8_weights(model: torch.nn.Module, state: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Put a `Q8Weight` in place of every parameter that `state` holds in Q8_0 (on a model
    still on the meta device, so no float copy is ever allocated). Returns the rest of the
    state, the tensors to load as usual."""
    rest = {}
    for name, value in state.items():
        if not isinstance(value, Q8Tensor):
            rest[name] = value
            continue
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        del module._parameters[attr]
        setattr(module, attr, Q8Weight(value.qs.contiguous(), value.scales.contiguous(), dtype))
    return rest

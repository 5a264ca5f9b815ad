"""8-bit weights kept int8 in memory: GGUF's Q8_0 (Kyutai's Candle q8) and bitsandbytes'
row-wise int8 (Kyutai's `*-pytorch-q8`).

Q8_0 (GGUF's 8-bit format) stores a matrix [out, in] as int8 values with one float16 scale
per block of 32 along `in`. Stock PyTorch has no matmul for per-block scales: its int8
weight-only op takes one scale per row, and requantizing to that would change the weights.
So a small C++ kernel (compiled on first use with `torch.utils.cpp_extension`, cached
afterwards) computes y = x W^T block by block from the int8 values; where it cannot be
built, or on GPUs, the weights are dequantized a slab of rows at a time instead.

Row-wise int8 (`W = CB * SCB / 127`, one float32 scale per row) maps onto PyTorch's own
int8 weight-only matmul, `torch._weight_int8pack_mm`.

A `QuantizedWeight` stands where a layer's float weight was. It implements
`__torch_function__`, so `F.linear` and `F.embedding` on it reach these kernels while the
model code stays unchanged.
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


@dataclass
class Int8Rows:
    """bitsandbytes' row-wise int8: `CB` [out, in] and float32 `SCB` [out]; W = CB * SCB / 127."""

    cb: torch.Tensor
    scb: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.cb.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.cb.float() * (self.scb.float() / 127)[:, None]).to(dtype)


class QuantizedWeight:
    """Shared behaviour of int8 weights in place of float parameters, computing in `dtype`.

    Subclasses are dataclass-like: their fields are tensors with one row per output, given
    to the constructor in order, followed by `dtype`.
    """

    dtype: torch.dtype
    shape: torch.Size

    def __init__(self, *tensors: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__(*tensors)
        self.dtype = dtype

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    def __getitem__(self, rows: slice) -> "QuantizedWeight":
        if not isinstance(rows, slice):
            raise TypeError("an 8-bit weight can only be sliced by rows")
        return type(self)(*(t[rows] for t in self._tensors()), dtype=self.dtype)

    def new_zeros(self, *shape, **kwargs) -> torch.Tensor:
        kwargs.setdefault("dtype", self.dtype)
        kwargs.setdefault("device", self.device)
        return torch.zeros(*shape, **kwargs)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            lead = x.shape[:-1]
            y = weight.linear(x.reshape(-1, x.shape[-1])).to(x.dtype)
            return (y if bias is None else y + bias).view(*lead, -1)
        if func is F.embedding:
            return args[1].embedding(args[0])
        raise TypeError(f"{func.__name__} is not supported on 8-bit weights")


class Q8Weight(QuantizedWeight, Q8Tensor):
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _cpu_kernel() if x.device.type == "cpu" else None
        if kernel is not None:
            return kernel.q8_matmul(x, self.qs, self.scales)
        return _slab_matmul(x, self)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return _dequantize_rows(self.qs[tokens], self.scales[tokens]).to(self.dtype)


class Int8RowWeight(QuantizedWeight, Int8Rows):
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # Scales in float32 with float32 activations: bfloat16 scales would round every row.
        return torch._weight_int8pack_mm(x.float(), self.cb, self.scb.float() / 127)


def _slab_matmul(x: torch.Tensor, weight: Q8Weight, slab: int = 1024) -> torch.Tensor:
    """Fallback: dequantize `slab` rows at a time, so no full float copy is ever made."""
    x = x.float()
    parts = [
        F.linear(x, _dequantize_rows(weight.qs[i : i + slab], weight.scales[i : i + slab]))
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
          _mm_prefetch((const char*)(blk + 1024), _MM_HINT_T0);
          __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)blk)));
          __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 16))));
          // One block's dot product, then its scale: two FMAs and a multiply per 32 weights.
          __m512 dot = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + b * 32 + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xr + b * 32)));
          if (b & 1) acc1 = _mm512_fmadd_ps(dot, _mm512_set1_ps(static_cast<float>(srow[b])), acc1);
          else acc0 = _mm512_fmadd_ps(dot, _mm512_set1_ps(static_cast<float>(srow[b])), acc0);
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
                extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False,
            )
        except Exception as exc:  # any build problem means: use the portable path
            log.warning("Q8 CPU kernel unavailable (%s); dequantizing slabs of rows instead", exc)
    return _kernel_state["kernel"]


def attach_int8_weights(
    model: torch.nn.Module, state: dict, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Put an 8-bit weight (on `device`) in place of every parameter that `state` holds in
    8 bits, on a model still on the meta device, so no float copy is ever allocated. Returns
    the rest of the state, the tensors to load as usual."""
    rest = {}
    for name, value in state.items():
        if isinstance(value, Q8Tensor):
            weight: QuantizedWeight = Q8Weight(
                value.qs.to(device).contiguous(), value.scales.to(device).contiguous(), dtype=dtype
            )
        elif isinstance(value, Int8Rows):
            weight = Int8RowWeight(
                value.cb.to(device).contiguous(), value.scb.to(device).float().contiguous(), dtype=dtype
            )
        else:
            rest[name] = value
            continue
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        del module._parameters[attr]
        setattr(module, attr, weight)
    return rest


def join_row_scales(state: dict[str, torch.Tensor]) -> dict:
    """bitsandbytes files store `X` (int8) beside `X_scb` (float32 per-row scales): pair them."""
    joined: dict = {}
    for name, value in state.items():
        if name.endswith("_scb"):
            continue
        scb = state.get(name + "_scb")
        joined[name] = value if scb is None else Int8Rows(value, scb)
    return joined

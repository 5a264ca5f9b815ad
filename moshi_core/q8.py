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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cpu_kernels import compile_cpu

Q8_BLOCK = 32


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

// R weight rows against N activation rows: y[n][r] = sum_b scale[r, b] * <q[r, block b], x[n][block b]>,
// in float32. Each 32-weight block is converted from int8 once (four 8-wide conversions, the
// costly part on AVX2), then serves all N activation rows: four FMAs each, and one with the
// block's scale. Batched conversations thus pay the conversion once.
template <int R, int N>
static inline void dot_tile(const int8_t* q, const uint16_t* s, int64_t K, const float* x, float* y, int64_t O) {
  const int64_t NB = K / 32;
  __m256 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm256_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    for (int r = 0; r < R; ++r) {
      const int8_t* blk = q + r * K + b * 32;
      _mm_prefetch((const char*)(blk + 768), _MM_HINT_T0);
      __m256 w[4];
      for (int i = 0; i < 4; ++i) w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 8 * i))));
      const __m256 scale = _mm256_set1_ps(_cvtsh_ss(s[r * NB + b]));
      for (int n = 0; n < N; ++n) {
        const float* xb = x + n * K + b * 32;
        __m256 d = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
        for (int i = 1; i < 4; ++i) d = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xb + 8 * i), d);
        acc[r][n] = _mm256_fmadd_ps(d, scale, acc[r][n]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) {
      __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r][n]), _mm256_extractf128_ps(acc[r][n], 1));
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));
      v = _mm_add_ss(v, _mm_movehdup_ps(v));
      y[n * O + r] = _mm_cvtss_f32(v);
    }
}

// Rows [o, o + R) for N activation rows; R is 4 or fewer at the end of the matrix.
template <int N>
static void rows_for(const int8_t* q, const uint16_t* s, int64_t K, const float* x, float* y, int64_t O, int64_t o) {
  const int64_t NB = K / 32;
  if (o + 4 <= O) dot_tile<4, N>(q + o * K, s + o * NB, K, x, y + o, O);
  else for (int64_t r = o; r < O; ++r) dot_tile<1, N>(q + r * K, s + r * NB, K, x, y + r, O);
}

// y[m, o] = sum_k x[m, k] W[o, k], W in Q8_0; tiles of 4 rows split over the threads, activation
// rows taken 2 at a time (4 x 2 accumulators fit AVX2's 16 registers beside the weights).
torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  auto xf = x.contiguous().to(torch::kFloat32);
  const int64_t M = xf.size(0), K = xf.size(1), O = q.size(0);
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous(), "Q8 weights must be contiguous");
  TORCH_CHECK(q.size(1) == K && K % 32 == 0, "Q8 matmul: shapes do not match");
  auto y = torch::empty({M, O}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (O + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin * 4; o < std::min(end * 4, O); o += 4) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) rows_for<2>(qp, sp, K, xp + m * K, yp + m * O, O, o);
      if (m < M) rows_for<1>(qp, sp, K, xp + m * K, yp + m * O, O, o);
    }
  });
  return y;
}
"""

_kernel_state: dict[str, object] = {}


def _cpu_kernel():
    """The compiled kernel, or None (no compiler, no AVX2/FMA/F16C): then the slab fallback runs."""
    if "kernel" not in _kernel_state:
        _kernel_state["kernel"] = compile_cpu("moshi_core_q8", _KERNEL_SOURCE, ["q8_matmul"])
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

"""Our C++ CPU kernels, compiled on first use with `torch.utils.cpp_extension` (cached
afterwards) for x86-64 CPUs with AVX2, FMA and F16C; without a compiler or those
instructions the callers take their portable PyTorch paths. (`moshi_core.q8` builds its
int8 matmul with `compile_cpu` too.)

- `decode_attention`: attention of one query per head over a bfloat16 KV cache, for
  streaming steps. PyTorch's CPU SDPA in bfloat16 converts blocks through a GEMM (25-35 ms per
  7B layer over a 3000-step cache on this project's 2-core AMD EPYC, 2 GB/s) and opens a
  parallel region even for the depth transformer's 8 keys (~8 ms under load); this kernel
  streams the keys and values once, in float32 arithmetic (3-5 ms). In float32, SDPA is as
  fast as this kernel, and stays: Mimi and the float32 parity targets keep PyTorch's sums.
"""

import logging

import torch

log = logging.getLogger(__name__)
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]

_ATTENTION_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

// Eight bfloat16 as float32: a bfloat16 is the top half of a float32.
static inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// q [B, H, D], keys/values [B, H, C, D] (bfloat16, contiguous), allowed [B, C] -> out [B, H, D] float32.
// Every slot is read, allowed or not: a step costs what it costs with a full window, the case
// real time must budget for.
static void attend(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, const bool* allowed, float* out,
                   int64_t B, int64_t H, int64_t C, int64_t D) {
  const float scale = 1.0f / std::sqrt((float)D);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(C), qf(D), acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const at::BFloat16* kb = k + bh * C * D;
      const at::BFloat16* vb = v + bh * C * D;
      const bool* ok = allowed + b * C;
      for (int64_t d = 0; d < D; ++d) qf[d] = (float)q[bh * D + d] * scale;
      float mx = -INFINITY;
      for (int64_t c = 0; c < C; ++c) {
        __m256 s = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[d]), load8(kb + c * D + d), s);
        p[c] = ok[c] ? hsum(s) : -INFINITY;
        mx = std::max(mx, p[c]);
      }
      if (mx == -INFINITY) {  // no key allowed: zeros, as SDPA gives
        for (int64_t d = 0; d < D; ++d) out[bh * D + d] = 0.f;
        continue;
      }
      float sum = 0.f;
      for (int64_t c = 0; c < C; ++c) { p[c] = std::exp(p[c] - mx); sum += p[c]; }
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(&acc[d], _mm256_setzero_ps());
      for (int64_t c = 0; c < C; ++c) {
        const __m256 w = _mm256_set1_ps(p[c]);
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(&acc[d], _mm256_fmadd_ps(w, load8(vb + c * D + d), _mm256_loadu_ps(&acc[d])));
      }
      for (int64_t d = 0; d < D; ++d) out[bh * D + d] = acc[d] / sum;
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor allowed) {
  const int64_t B = keys.size(0), H = keys.size(1), C = keys.size(2), D = keys.size(3);
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && D % 8 == 0, "decode_attention: layout");
  auto qc = q.contiguous();
  auto ok = allowed.contiguous();
  auto out = torch::empty({B, H, 1, D}, q.options().dtype(torch::kFloat32));
  attend(qc.data_ptr<at::BFloat16>(), keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(),
         ok.data_ptr<bool>(), out.data_ptr<float>(), B, H, C, D);
  return out.to(q.scalar_type());
}
"""


def compile_cpu(name: str, source: str, functions: list[str]):
    """The compiled extension, or None where it cannot be built (the reason is logged)."""
    try:
        flags = open("/proc/cpuinfo").read()
        if not all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c")):
            raise RuntimeError("this CPU lacks AVX2, FMA or F16C")
        from torch.utils.cpp_extension import load_inline

        return load_inline(name, cpp_sources=source, functions=functions, extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # any build problem means: use the portable path
        log.warning("CPU kernel %s unavailable (%s); using the portable path", name, exc)
        return None


_attention: dict[str, object] = {}


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor):
    """softmax(q kᵀ / √D) v for one query step [B, H, 1, D] over a bfloat16 cache [B, H, C, D]
    where `allowed` [B, C]; None when the kernel does not apply (then use SDPA)."""
    if (q.device.type != "cpu" or q.shape[2] != 1 or q.shape[3] % 8 or q.dtype != torch.bfloat16
            or keys.dtype != torch.bfloat16 or not keys.is_contiguous()):
        return None
    if "kernel" not in _attention:
        _attention["kernel"] = compile_cpu("moshi_core_attention", _ATTENTION_SOURCE, ["decode_attention"])
    kernel = _attention["kernel"]
    return None if kernel is None else kernel.decode_attention(q, keys, values, allowed)

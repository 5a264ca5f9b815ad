// One streaming step of self-attention, fused, for x86-64 CPUs with AVX2, FMA and F16C:
// rotate the new query and key (RoPE), write the key and value into each row's ring KV cache,
// and attend over the cache. One call per layer instead of some twenty PyTorch operations,
// and only the allowed cache entries are read: a conversation's step costs what its window
// holds, and a step of a cache in bfloat16 streams it at memory speed (PyTorch's CPU SDPA in
// bfloat16 converts it through a GEMM).
//
// Arithmetic is float32. The rotated query and key are rounded to the cache's dtype first, as
// the unfused path stores and reads them.

// Built after common.h, as one unit with the other kernels (see there).
#include <cmath>
#include <vector>

namespace {

// x [D] rotated by RoPE's interleaved pairs (rot: D / 2 (cos, sin) pairs), or copied; rounded to T.
template <typename T>
inline void rotate_into(const T* x, const float* rot, int64_t D, T* out) {
  for (int64_t i = 0; i < D; i += 2) {
    const float re = static_cast<float>(x[i]), im = static_cast<float>(x[i + 1]);
    if (rot) {
      const float c = rot[i], s = rot[i + 1];
      out[i] = static_cast<T>(re * c - im * s);
      out[i + 1] = static_cast<T>(re * s + im * c);
    } else {
      out[i] = x[i];
      out[i + 1] = x[i + 1];
    }
  }
}

// qkv [A, T, 3, H, D] (the projection's output), rot [A, T, D / 2, 2] or null, caches
// [N, H, C, D]; query row a uses cache row slots[a] and writes its T new keys and values at
// entries index[a, t] first (a step sees its own earlier keys), then step t attends to the
// entries allowed[a, t]. out [A, T, H, D].
template <typename T>
void attend(const T* qkv, const float* rot, T* keys, T* values, const int64_t* slots, const int64_t* index,
            const bool* allowed, T* out, int64_t A, int64_t S, int64_t H, int64_t C, int64_t D) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, A * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(C), qf(D), acc(D);
    std::vector<T> q(S * D);
    for (int64_t ah = begin; ah < end; ++ah) {
      const int64_t a = ah / H, h = ah % H;
      const int64_t cache = (slots[a] * H + h) * C * D;
      T* kc = keys + cache;
      T* vc = values + cache;
      for (int64_t t = 0; t < S; ++t) {
        const T* x = qkv + (a * S + t) * 3 * H * D;
        const float* r = rot ? rot + (a * S + t) * D : nullptr;
        const int64_t entry = index[a * S + t];
        rotate_into(x + h * D, r, D, q.data() + t * D);
        rotate_into(x + (H + h) * D, r, D, kc + entry * D);
        std::copy(x + (2 * H + h) * D, x + (2 * H + h + 1) * D, vc + entry * D);
      }
      for (int64_t t = 0; t < S; ++t) {
        for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(q[t * D + d]) * scale;
        const bool* ok = allowed + (a * S + t) * C;
        float mx = -INFINITY;
        for (int64_t c = 0; c < C; ++c) {
          if (!ok[c]) continue;
          __m256 s = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[d]), load8(kc + c * D + d), s);
          p[c] = hsum(s);
          mx = std::max(mx, p[c]);
        }
        T* o = out + ((a * S + t) * H + h) * D;
        if (mx == -INFINITY) {  // nothing to attend to: zeros, as SDPA gives
          std::fill(o, o + D, static_cast<T>(0.f));
          continue;
        }
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t c = 0; c < C; ++c) {
          if (!ok[c]) continue;
          const float w = std::exp(p[c] - mx);
          sum += w;
          const __m256 wv = _mm256_set1_ps(w);
          for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(&acc[d], _mm256_fmadd_ps(wv, load8(vc + c * D + d), _mm256_loadu_ps(&acc[d])));
        }
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / sum);
      }
    }
  });
}

}  // namespace

// See above. qkv [A, T, 3 * H * D], rotation [A, T, D / 2, 2] float32 (or empty: no RoPE), keys
// and values [N, H, C, D] (float32 or bfloat16, like qkv), slots [A] and index [A, T] int64,
// allowed [A, T, C] bool -> [A, T, H * D].
torch::Tensor attention_step(torch::Tensor qkv, torch::Tensor rotation, torch::Tensor keys, torch::Tensor values,
                             torch::Tensor slots, torch::Tensor index, torch::Tensor allowed) {
  const int64_t N = keys.size(0), H = keys.size(1), C = keys.size(2), D = keys.size(3);
  TORCH_CHECK(qkv.dim() == 3, "attention_step: qkv must be [rows, steps, 3 * H * D]");
  const int64_t A = qkv.size(0), S = qkv.size(1);
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && values.sizes() == keys.sizes(), "attention_step: cache layout");
  TORCH_CHECK(qkv.is_contiguous() && qkv.size(2) == 3 * H * D && D % 8 == 0, "attention_step: qkv shape");
  TORCH_CHECK(qkv.scalar_type() == keys.scalar_type() && values.scalar_type() == keys.scalar_type(), "attention_step: dtypes");
  TORCH_CHECK(slots.numel() == A && index.numel() == A * S && allowed.numel() == A * S * C, "attention_step: rows");
  TORCH_CHECK(rotation.numel() == 0 || (rotation.is_contiguous() && rotation.numel() == A * S * D), "attention_step: rotation");
  const auto sl = slots.contiguous(), ix = index.contiguous();
  const auto ok = allowed.contiguous();
  const int64_t* slp = sl.data_ptr<int64_t>();
  const int64_t* ixp = ix.data_ptr<int64_t>();
  for (int64_t a = 0; a < A; ++a) TORCH_CHECK(slp[a] >= 0 && slp[a] < N, "attention_step: slot out of range");
  for (int64_t i = 0; i < A * S; ++i) TORCH_CHECK(ixp[i] >= 0 && ixp[i] < C, "attention_step: entry out of range");
  const float* rot = rotation.numel() ? rotation.data_ptr<float>() : nullptr;
  auto out = torch::empty({A, S, H * D}, qkv.options());
  if (qkv.scalar_type() == torch::kBFloat16) {
    attend(qkv.data_ptr<at::BFloat16>(), rot, keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(), slp, ixp,
           ok.data_ptr<bool>(), out.data_ptr<at::BFloat16>(), A, S, H, C, D);
  } else {
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat32, "attention_step: float32 or bfloat16 only");
    attend(qkv.data_ptr<float>(), rot, keys.data_ptr<float>(), values.data_ptr<float>(), slp, ixp, ok.data_ptr<bool>(),
           out.data_ptr<float>(), A, S, H, C, D);
  }
  return out;
}

// The input window of a streaming causal conv, for x86-64 CPUs with AVX2 and FMA: the
// stream's last input samples followed by the new ones, through the ELU that precedes every
// SEANet conv. One pass instead of PyTorch's ELU (a slow expm1) and concatenation.

// Built after common.h, as one unit with the other kernels (see there).
#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

// expm1 of eight floats in [-87, 0]: x = n ln2 + r with |r| <= ln2 / 2, then
// expm1(x) = 2^n expm1(r) + (2^n - 1), with expm1(r) from its Taylor series (relative error
// under 1e-8 there). Accurate near 0, where exp(x) - 1 would cancel.
inline __m256 expm1_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, ln2 split in two so that n * ln2_hi is exact.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  // r + r^2 (1/2 + r (1/6 + ... r/8!)), Horner.
  __m256 p = _mm256_set1_ps(1.f / 40320.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 5040.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  const __m256 em1_r = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 two_n = _mm256_castsi256_ps(bits);  // exact: n in [-126, 0]
  return _mm256_fmadd_ps(two_n, em1_r, _mm256_sub_ps(two_n, _mm256_set1_ps(1.f)));
}

inline __m256 elu8(__m256 x) {
  const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(x, expm1_nonpositive(_mm256_min_ps(x, _mm256_setzero_ps())), negative);
}

inline float elu1(float x) { return x < 0.f ? std::expm1(x) : x; }

void elu_span(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, elu8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = elu1(x[i]);
}

}  // namespace

// [previous | elu(x)] (or [previous | x] without `elu`) for x [B, L, C] and the stream state
// previous [B, P, C], which then takes the window's last P samples. Float32 only.
torch::Tensor elu_window(torch::Tensor x, torch::Tensor previous, bool elu) {
  TORCH_CHECK(x.dim() == 3 && previous.dim() == 3 && x.size(0) == previous.size(0) && x.size(2) == previous.size(2),
              "elu_window: x [B, L, C] and previous [B, P, C]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && previous.scalar_type() == torch::kFloat32, "elu_window: float32 only");
  TORCH_CHECK(previous.is_contiguous(), "elu_window: previous must be contiguous");
  const auto xc = x.contiguous();
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), P = previous.size(1);
  auto window = torch::empty({B, P + L, C}, x.options());
  const float* src = xc.data_ptr<float>();
  float* prev = previous.data_ptr<float>();
  float* dst = window.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* row = dst + b * (P + L) * C;
    std::memcpy(row, prev + b * P * C, sizeof(float) * P * C);
    const float* in = src + b * L * C;
    float* out = row + P * C;
    if (!elu) {
      std::memcpy(out, in, sizeof(float) * L * C);
      continue;
    }
    // Chunks of whole rows, split over threads when there is enough work.
    at::parallel_for(0, L, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      elu_span(in + begin * C, out + begin * C, (end - begin) * C);
    });
  }
  for (int64_t b = 0; b < B; ++b) std::memcpy(prev + b * P * C, dst + (b * (P + L) + L) * C, sizeof(float) * P * C);
  return window;
}

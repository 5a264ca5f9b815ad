// The input window of a streaming causal conv, for x86-64 CPUs with AVX2 and FMA: the
// stream's last input samples followed by the new ones, through the ELU that precedes every
// SEANet conv. One pass instead of PyTorch's ELU (a slow expm1) and concatenation.

// Built after common.h, as one unit with the other kernels (see there).
#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

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

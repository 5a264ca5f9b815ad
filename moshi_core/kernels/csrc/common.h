// What every kernel of csrc/ shares. `moshi_core/kernels/build.py` builds this file and the
// kernels' .cpp files as one translation unit, this one first: the PyTorch headers are parsed
// once (most of the build time), and the helpers below exist once.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

// Eight bfloat16s widened to float32: a bfloat16 is the top half of a float32.
inline __m256 bf16x8(const void* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) { return bf16x8(p); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

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

}  // namespace

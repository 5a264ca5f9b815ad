// Row-wise operations of a transformer step, fused, for x86-64 CPUs with AVX2, FMA and F16C:
// one call instead of the handful of PyTorch operations (and dtype conversions) each takes,
// which on a streaming step of a few rows cost more than the arithmetic. The float32-only
// ones (LayerNorm, GELU, the layer-scaled residual) are Mimi's: a step of its transformers
// has two rows, and PyTorch's three operations took a seventh of it.

// Built after common.h, as one unit with the other kernels (see there).
#include <cmath>
#include <cstring>

namespace {

template <typename T>
void rms_rows(const T* x, const float* alpha, float eps, T* out, int64_t rows, int64_t dim) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * dim;
      float sum = 0.f;
      for (int64_t i = 0; i < dim; ++i) {
        const float v = static_cast<float>(xr[i]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(eps + sum / static_cast<float>(dim));
      for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = static_cast<T>(static_cast<float>(xr[i]) * (alpha[i] * inv));
    }
  });
}

// silu(gate) * up for rows [gate | up]; silu rounded to T before the product, as PyTorch's
// two operations round.
template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t rows, int64_t hidden) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * 2 * hidden;
      const T* u = g + hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = static_cast<float>(g[i]);
        const T silu = static_cast<T>(v / (1.f + std::exp(-v)));
        out[r * hidden + i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(u[i]));
      }
    }
  });
}

// Eight floats summed in one vector; the tail (dim % 8) in a scalar.
inline float sum_rows(const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
  float sum = hsum(acc);
  for (; i < n; ++i) sum += x[i];
  return sum;
}

// (x - mean) / sqrt(var + eps) * weight + bias per row: the mean first, then the variance as
// the mean of squared deviations (two passes, no cancellation), in float32.
void layer_norm_rows(const float* x, const float* weight, const float* bias, float eps, float* out,
                     int64_t rows, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = out + r * dim;
    const float mean = sum_rows(xr, dim) / static_cast<float>(dim);
    const __m256 m = _mm256_set1_ps(mean);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + i), m);
      acc = _mm256_fmadd_ps(d, d, acc);
    }
    float squares = hsum(acc);
    for (; i < dim; ++i) squares += (xr[i] - mean) * (xr[i] - mean);
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
    const __m256 s = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= dim; i += 8) {
      const __m256 normed = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), m), s);
      _mm256_storeu_ps(yr + i, _mm256_fmadd_ps(normed, _mm256_loadu_ps(weight + i), _mm256_loadu_ps(bias + i)));
    }
    for (; i < dim; ++i) yr[i] = (xr[i] - mean) * inv * weight[i] + bias[i];
  }
}

// erfc(a) for a >= 0 as t P(t) exp(-a^2), t = 1 / (1 + p a): Abramowitz and Stegun 7.1.26
// (absolute error under 1.5e-7, the same approximation as PyTorch's vectorized erf).
inline __m256 erfc_nonnegative(__m256 a) {
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  const __m256 exp_minus_square = _mm256_add_ps(expm1_nonpositive(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), a)),
                                                _mm256_set1_ps(1.f));
  return _mm256_mul_ps(_mm256_mul_ps(t, p), exp_minus_square);
}

// gelu(x) = x (1 + erf(x / sqrt 2)) / 2, written with c = erfc(|x| / sqrt 2) / 2 as x (1 - c)
// for x >= 0 and x c below: no 1 - erf cancellation on the negative side.
inline __m256 gelu8(__m256 x) {
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 c = _mm256_mul_ps(erfc_nonnegative(_mm256_mul_ps(magnitude, _mm256_set1_ps(0.70710678118654752f))),
                                 _mm256_set1_ps(0.5f));
  const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_mul_ps(x, _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.f), c), c, negative));
}

void gelu_span(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, gelu8(_mm256_loadu_ps(x + i)));
  if (i == n) return;
  float tail[8] = {}, result[8];  // the last n % 8 through the same arithmetic
  std::memcpy(tail, x + i, sizeof(float) * (n - i));
  _mm256_storeu_ps(result, gelu8(_mm256_loadu_ps(tail)));
  std::memcpy(out + i, result, sizeof(float) * (n - i));
}

void check_float_rows(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, what, ": float32 only");
}

template <typename F>
void dispatch(const torch::Tensor& x, F&& f) {
  switch (x.scalar_type()) {
    case torch::kFloat32: f(float{}); break;
    case torch::kBFloat16: f(at::BFloat16{}); break;
    case torch::kFloat16: f(at::Half{}); break;
    default: TORCH_CHECK(false, "norm kernels: float32, bfloat16 or float16 only");
  }
}

}  // namespace

// x * alpha / sqrt(eps + mean(x^2)) over the last dimension, in float32, rounded to x's dtype.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor alpha, double eps) {
  const int64_t dim = x.size(-1);
  TORCH_CHECK(alpha.numel() == dim, "rms_norm: one alpha per channel");
  const auto xc = x.contiguous();
  const auto a = alpha.to(torch::kFloat32).contiguous();
  auto out = torch::empty_like(xc);
  dispatch(xc, [&](auto zero) {
    using T = decltype(zero);
    rms_rows(xc.data_ptr<T>(), a.data_ptr<float>(), static_cast<float>(eps), out.data_ptr<T>(), xc.numel() / dim, dim);
  });
  return out;
}

// silu(x[..., :H]) * x[..., H:] -> [..., H].
torch::Tensor silu_mul(torch::Tensor x) {
  const int64_t hidden = x.size(-1) / 2;
  TORCH_CHECK(x.size(-1) == 2 * hidden, "silu_mul: the last dimension is [gate | up]");
  const auto xc = x.contiguous();
  auto sizes = xc.sizes().vec();
  sizes.back() = hidden;
  auto out = torch::empty(sizes, xc.options());
  dispatch(xc, [&](auto zero) {
    using T = decltype(zero);
    silu_mul_rows(xc.data_ptr<T>(), out.data_ptr<T>(), xc.numel() / (2 * hidden), hidden);
  });
  return out;
}

// LayerNorm over the last dimension (weight and bias per channel), float32.
torch::Tensor layer_norm(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, double eps) {
  check_float_rows(x, "layer_norm");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.numel() == dim && bias.numel() == dim, "layer_norm: one weight and bias per channel");
  const auto xc = x.contiguous();
  const auto w = weight.to(torch::kFloat32).contiguous(), b = bias.to(torch::kFloat32).contiguous();
  auto out = torch::empty_like(xc);
  layer_norm_rows(xc.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps),
                  out.data_ptr<float>(), xc.numel() / dim, dim);
  return out;
}

// The exact (erf) GELU, float32.
torch::Tensor gelu(torch::Tensor x) {
  check_float_rows(x, "gelu");
  const auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  gelu_span(xc.data_ptr<float>(), out.data_ptr<float>(), xc.numel());
  return out;
}

// x + scale * update, scale per channel (a residual through a layer scale), float32.
torch::Tensor add_scaled(torch::Tensor x, torch::Tensor update, torch::Tensor scale) {
  check_float_rows(x, "add_scaled");
  check_float_rows(update, "add_scaled");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(x.sizes() == update.sizes() && scale.numel() == dim, "add_scaled: x and update alike, one scale per channel");
  const auto xc = x.contiguous(), uc = update.contiguous();
  const auto s = scale.to(torch::kFloat32).contiguous();
  auto out = torch::empty_like(xc);
  const float *xp = xc.data_ptr<float>(), *up = uc.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  for (int64_t r = 0; r < xc.numel() / dim; ++r)
    for (int64_t i = 0; i < dim; ++i) yp[r * dim + i] = std::fma(sp[i], up[r * dim + i], xp[r * dim + i]);
  return out;
}

// Row-wise operations of a transformer step, fused, for x86-64 CPUs with AVX2, FMA and F16C:
// one call instead of the handful of PyTorch operations (and dtype conversions) each takes,
// which on a streaming step of a few rows cost more than the arithmetic.

// Built after common.h, as one unit with the other kernels (see there).
#include <cmath>

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

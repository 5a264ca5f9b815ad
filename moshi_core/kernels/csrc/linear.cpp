// Matrix products with few activation rows ("skinny"), y[M, O] = x[M, K] W[O, K]^T (+ bias),
// for x86-64 CPUs with AVX2, FMA and F16C.
//
// A streaming step multiplies a handful of rows (one per conversation) by every weight of the
// model once: the cost is reading the weights. PyTorch's CPU GEMMs pack the weight matrix for
// each call of more than one row, and its bfloat16 path converts through a slow route; here
// each weight is read once, converted to float32 in registers, and used for every activation
// row while it is there.
//
// Weights: float32, bfloat16, float16 [O, K], or Q8_0 (int8 [O, K] with one float16 scale per
// block of 32 along K). Arithmetic is float32. Every output is the same sum in the same order
// whatever M and the thread count are, so a row's result does not depend on what it is batched
// with. A Q8_0 weight is dequantized exactly (an int8 times a float16 fits float32).
//
// Memory: the rows of a tile are short streams (a 1024-wide int8 row is 16 cache lines), too
// short for the hardware prefetcher to ramp up, so while a tile is computed the next tile's
// bytes are prefetched, spread over its block steps (1.5x on the depth transformer's matrices).

// Built after common.h, as one unit with the other kernels (see there).
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;  // columns per inner step, Q8_0's block size
constexpr int64_t LINE = 64;   // bytes per cache line

// A weight format yields one block of 32 weights of a row as four vectors of eight floats; a
// `scaled` format also yields a scale that multiplies the block's dot product.
template <typename T, int64_t Bytes>
struct FloatWeights {
  static constexpr bool scaled = false;
  static constexpr int64_t bytes_per_weight = Bytes;
  const T* w;
  int64_t K;
  const char* row_bytes(int64_t row) const { return reinterpret_cast<const char*>(w + row * K); }
};

// The float formats also take a K that is a multiple of 8 only: the columns past the last
// whole block are read eight at a time (`eight`).
struct F32Weights : FloatWeights<float, 4> {
  inline __m256 eight(int64_t row, int64_t k) const { return _mm256_loadu_ps(w + row * K + k); }
  inline void block(int64_t row, int64_t b, __m256 out[4]) const {
    for (int i = 0; i < 4; ++i) out[i] = eight(row, b * BLOCK + 8 * i);
  }
};

struct BF16Weights : FloatWeights<uint16_t, 2> {
  inline __m256 eight(int64_t row, int64_t k) const { return bf16x8(w + row * K + k); }
  inline void block(int64_t row, int64_t b, __m256 out[4]) const {
    for (int i = 0; i < 4; ++i) out[i] = eight(row, b * BLOCK + 8 * i);
  }
};

struct F16Weights : FloatWeights<uint16_t, 2> {
  inline __m256 eight(int64_t row, int64_t k) const { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + row * K + k))); }
  inline void block(int64_t row, int64_t b, __m256 out[4]) const {
    for (int i = 0; i < 4; ++i) out[i] = eight(row, b * BLOCK + 8 * i);
  }
};

// Q8_0: a block is converted without its scale, which then multiplies the block's dot product
// once per activation row (fewer operations than scaling every weight).
struct Q8Weights {
  static constexpr bool scaled = true;
  static constexpr int64_t bytes_per_weight = 1;
  const int8_t* q;
  const uint16_t* scales;  // float16 bits, K / 32 per row
  int64_t K;
  const char* row_bytes(int64_t row) const { return reinterpret_cast<const char*>(q + row * K); }
  inline void block(int64_t row, int64_t b, __m256 out[4]) const {
    const int8_t* p = q + row * K + b * BLOCK;
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * i))));
  }
  inline __m256 scale(int64_t row, int64_t b) const { return _mm256_set1_ps(_cvtsh_ss(scales[row * (K / BLOCK) + b])); }
  // The scales of `rows` rows from `row` on, one line per call while b walks the lines.
  inline void prefetch_scales(int64_t row, int64_t rows, int64_t b) const {
    const char* first = reinterpret_cast<const char*>(scales + row * (K / BLOCK));
    if (b * LINE < rows * (K / BLOCK) * 2) _mm_prefetch(first + b * LINE, _MM_HINT_T0);
  }
};

template <typename T>
inline void store(T* y, float v) { *y = static_cast<T>(v); }  // bfloat16/float16: round to nearest even

// Rows [r0, r0 + R) of W against activation rows [n0, n0 + N): R * N accumulators, each weight
// block converted once for the N rows; `next` is the first of the R rows to prefetch (or -1).
// x is float32 [M, K], y is [M, O].
template <int R, int N, typename W, typename Y>
inline void tile(const W& w, int64_t r0, int64_t next, const float* x, int64_t n0, int64_t K, const float* bias,
                 Y* y, int64_t O) {
  constexpr int64_t lines_per_block = (R * BLOCK * W::bytes_per_weight + LINE - 1) / LINE;
  const char* ahead = next >= 0 ? w.row_bytes(next) : nullptr;
  __m256 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm256_setzero_ps();
  const float* xs = x + n0 * K;
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    if (ahead) {  // the next tile is R * K contiguous weights: one block step's share of its lines
      for (int64_t l = 0; l < lines_per_block; ++l) _mm_prefetch(ahead + (b * lines_per_block + l) * LINE, _MM_HINT_T0);
      if constexpr (W::scaled) w.prefetch_scales(next, R, b);
    }
    for (int r = 0; r < R; ++r) {
      __m256 wv[4];
      w.block(r0 + r, b, wv);
      if constexpr (W::scaled) {
        const __m256 scale = w.scale(r0 + r, b);
        for (int n = 0; n < N; ++n) {
          const float* xb = xs + n * K + b * BLOCK;
          __m256 dot = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xb));
          for (int i = 1; i < 4; ++i) dot = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xb + 8 * i), dot);
          acc[r][n] = _mm256_fmadd_ps(dot, scale, acc[r][n]);
        }
      } else {
        for (int i = 0; i < 4; ++i)
          for (int n = 0; n < N; ++n)
            acc[r][n] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xs + n * K + b * BLOCK + 8 * i), acc[r][n]);
      }
    }
  }
  if constexpr (!W::scaled) {
    for (int64_t k = K / BLOCK * BLOCK; k < K; k += 8)
      for (int r = 0; r < R; ++r) {
        const __m256 wv = w.eight(r0 + r, k);
        for (int n = 0; n < N; ++n) acc[r][n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs + n * K + k), acc[r][n]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n)
      store(y + (n0 + n) * O + r0 + r, hsum(acc[r][n]) + (bias ? bias[r0 + r] : 0.f));
}

// R rows against all M activation rows, in groups of N = min(4, 8 / R): R * N accumulators and
// the weights fit AVX2's sixteen registers. The next tile is prefetched on the first pass only.
template <int R, typename W, typename Y>
inline void rows(const W& w, int64_t r0, int64_t next, const float* x, int64_t M, int64_t K, const float* bias,
                 Y* y, int64_t O) {
  constexpr int N = std::min(4, 8 / R);
  int64_t n = 0;
  for (; n + N <= M; n += N) tile<R, N>(w, r0, n == 0 ? next : -1, x, n, K, bias, y, O);
  if (n == M) return;
  next = n == 0 ? next : -1;
  switch (M - n) {  // fewer than N rows left
    case 3: if constexpr (N > 3) tile<R, 3>(w, r0, next, x, n, K, bias, y, O); break;
    case 2: if constexpr (N > 2) tile<R, 2>(w, r0, next, x, n, K, bias, y, O); break;
    case 1: if constexpr (N > 1) tile<R, 1>(w, r0, next, x, n, K, bias, y, O); break;
  }
}

template <int R, typename W, typename Y>
void matmul_tiles(const W& w, const float* x, int64_t M, int64_t K, int64_t O, const float* bias, Y* y) {
  const int64_t tiles = O / R;
  // At least ~64 KB of weights per task: small matrices are not split thinner than a thread
  // start costs.
  const int64_t grain = std::max<int64_t>(1, 65536 / (R * K * W::bytes_per_weight));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rows<R>(w, t * R, t + 1 < end ? (t + 1) * R : -1, x, M, K, bias, y, O);
  });
  for (int64_t r = tiles * R; r < O; ++r) rows<1>(w, r, -1, x, M, K, bias, y, O);
}

// Tiles of 8 weight rows for one activation row, 4 for two, 2 beyond: as many rows in flight
// (independent sums) as the registers hold.
template <typename W, typename Y>
void matmul(const W& w, const float* x, int64_t M, int64_t K, int64_t O, const float* bias, Y* y) {
  if (M == 1) matmul_tiles<8>(w, x, M, K, O, bias, y);
  else if (M == 2) matmul_tiles<4>(w, x, M, K, O, bias, y);
  else matmul_tiles<2>(w, x, M, K, O, bias, y);
}

// x [M, K] as float32: x's own data when it is float32, else converted here into `buffer`
// (a PyTorch conversion costs more than the product on a step of a few rows).
template <typename T>
const float* widen(const T* x, int64_t n, std::vector<float>& buffer) {
  buffer.resize(n);
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(x[i]);
  return buffer.data();
}

template <typename W>
torch::Tensor run(const W& w, const torch::Tensor& x_in, int64_t O, const c10::optional<torch::Tensor>& bias) {
  const auto x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value()) {
    bf = bias->scalar_type() == torch::kFloat32 ? bias->contiguous() : bias->to(torch::kFloat32).contiguous();
    bp = bf.data_ptr<float>();
  }
  auto y = torch::empty({M, O}, x.options());
  std::vector<float> buffer;
  const float* xp = nullptr;
  switch (x.scalar_type()) {
    case torch::kFloat32: xp = x.data_ptr<float>(); break;
    case torch::kBFloat16: xp = widen(x.data_ptr<at::BFloat16>(), M * K, buffer); break;
    case torch::kFloat16: xp = widen(x.data_ptr<at::Half>(), M * K, buffer); break;
    default: TORCH_CHECK(false, "skinny_linear: activations must be float32, bfloat16 or float16");
  }
  switch (x.scalar_type()) {
    case torch::kFloat32: matmul(w, xp, M, K, O, bp, y.data_ptr<float>()); break;
    case torch::kBFloat16: matmul(w, xp, M, K, O, bp, y.data_ptr<at::BFloat16>()); break;
    case torch::kFloat16: matmul(w, xp, M, K, O, bp, y.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "skinny_linear: activations must be float32, bfloat16 or float16");
  }
  return y;
}

void check(const torch::Tensor& x, const torch::Tensor& weight, int64_t multiple) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "skinny_linear: shapes do not match");
  TORCH_CHECK(weight.is_contiguous(), "skinny_linear: the weight must be contiguous");
  TORCH_CHECK(weight.size(1) % multiple == 0, "skinny_linear: the inner dimension must be a multiple of ", multiple);
}

}  // namespace

// y = x W^T (+ bias) for a float32, bfloat16 or float16 W [O, K] (K a multiple of 8); y has x's dtype.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  check(x, weight, 8);
  const int64_t O = weight.size(0), K = weight.size(1);
  switch (weight.scalar_type()) {
    case torch::kFloat32: return run(F32Weights{{weight.data_ptr<float>(), K}}, x, O, bias);
    case torch::kBFloat16:
      return run(BF16Weights{{reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), K}}, x, O, bias);
    case torch::kFloat16:
      return run(F16Weights{{reinterpret_cast<const uint16_t*>(weight.data_ptr<at::Half>()), K}}, x, O, bias);
    default: TORCH_CHECK(false, "skinny_linear: weights must be float32, bfloat16 or float16");
  }
}

// y = x W^T for a Q8_0 W: int8 values [O, K] and float16 scales [O, K / 32]; y has x's dtype.
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor scales) {
  check(x, qs, BLOCK);
  TORCH_CHECK(scales.is_contiguous() && scales.size(0) == qs.size(0) && scales.size(1) * BLOCK == qs.size(1),
              "q8_linear: one scale per block of 32 weights");
  const int64_t K = qs.size(1);
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return run(Q8Weights{qs.data_ptr<int8_t>(), sp, K}, x, qs.size(0), c10::nullopt);
}

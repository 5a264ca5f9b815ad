// Matrix products with few activation rows ("skinny"), y[M, O] = x[M, K] W[O, K]^T (+ bias),
// for x86-64 CPUs with AVX2, FMA and F16C.
//
// A streaming step multiplies a handful of rows (one per conversation) by every weight of the
// model once: the cost is reading the weights. PyTorch's CPU GEMMs pack the weight matrix for
// each call of more than one row, and its bfloat16 path converts through a slow route; here
// each weight is read once, converted in registers, and used for every activation row while
// it is there.
//
// Weights: float32, bfloat16, float16 [O, K], or Q8_0 (int8 [O, K] with one float16 scale per
// block of 32 along K). Every output is the same sum in the same order whatever M and the
// thread count are, so a row's result does not depend on what it is batched with.
//
// Q8_0 weights take float32 or int8 activations:
// - float32 ("strict"): the weight block is dequantized exactly (an int8 times a float16 fits
//   float32) and the arithmetic is float32, as for the float weights.
// - int8 (GGUF runtimes' arithmetic, llama.cpp's ggml_vec_dot_q8_0_q8_0): each activation row
//   is quantized to Q8_0 as GGUF's reference quantize_row_q8_0 does, except that its scale
//   stays float32 (nothing stores it). A block's product is then an exact int32 dot product in
//   eight lanes of four, scaled by d_w * d_x and accumulated lane-wise in float32 by FMA; the
//   eight lanes are summed at the end (`hsum`). The int8 dot runs on AVX-VNNI or AVX-512 VNNI
//   where the CPU has them (chosen at run time, 256 bits wide in every case, so the int32
//   lanes and the float arithmetic are the same on every CPU), else on AVX2.
//
// Memory: the rows of a tile are short streams (a 1024-wide int8 row is 16 cache lines), too
// short for the hardware prefetcher to ramp up, so while a tile is computed the next tile's
// bytes are prefetched, spread over its block steps (1.5x on the depth transformer's matrices).

// Built after common.h, as one unit with the other kernels (see there).
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;  // columns per inner step, Q8_0's block size
constexpr int64_t LINE = 64;   // bytes per cache line

// Activations as float32 rows [M, K].
struct FloatRows {
  const float* x;
  int64_t K;
  FloatRows from(int64_t n) const { return {x + n * K, K}; }
  const float* block(int64_t n, int64_t b) const { return x + n * K + b * BLOCK; }
};

// The int8 x int8 dot product of a block in eight int32 lanes, lane j summing bytes 4j..4j+3:
// `u` holds |w| (unsigned), `s` the activations with w's signs, so no product overflows.
struct Avx2Dot {
  static inline __m256i dot(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
  }
};

struct AvxVnniDot {
  __attribute__((target("avxvnni"))) static inline __m256i dot(__m256i u, __m256i s) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
  }
};

struct Avx512VnniDot {
  __attribute__((target("avx512vnni,avx512vl"))) static inline __m256i dot(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
  }
};

// Activations quantized to Q8_0 rows: int8 [M, K] and one float32 scale per block of 32.
template <typename Dot>
struct Q8Rows {
  const int8_t* q;
  const float* d;
  int64_t K;
  Q8Rows from(int64_t n) const { return {q + n * K, d + n * (K / BLOCK), K}; }
};

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
};

struct BF16Weights : FloatWeights<uint16_t, 2> {
  inline __m256 eight(int64_t row, int64_t k) const { return bf16x8(w + row * K + k); }
};

struct F16Weights : FloatWeights<uint16_t, 2> {
  inline __m256 eight(int64_t row, int64_t k) const { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + row * K + k))); }
};

// Q8_0: with float activations a block is converted without its scale, which then multiplies
// the block's dot product once per activation row (fewer operations than scaling every weight).
struct Q8Weights {
  static constexpr bool scaled = true;
  static constexpr int64_t bytes_per_weight = 1;
  const int8_t* q;
  const uint16_t* scales;  // float16 bits, K / 32 per row
  int64_t K;
  const char* row_bytes(int64_t row) const { return reinterpret_cast<const char*>(q + row * K); }
  inline void eights(int64_t row, int64_t b, __m256 out[4]) const {
    const int8_t* p = q + row * K + b * BLOCK;
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * i))));
  }
  inline float scale(int64_t row, int64_t b) const { return _cvtsh_ss(scales[row * (K / BLOCK) + b]); }
  // The scales of `rows` rows from `row` on, one line per call while b walks the lines.
  inline void prefetch_scales(int64_t row, int64_t rows, int64_t b) const {
    const char* first = reinterpret_cast<const char*>(scales + row * (K / BLOCK));
    if (b * LINE < rows * (K / BLOCK) * 2) _mm_prefetch(first + b * LINE, _MM_HINT_T0);
  }
};

// Block b of weight row `row` against N activation rows: acc[n] += their products.
template <int N, typename W>
inline void accumulate(const W& w, int64_t row, int64_t b, const FloatRows& x, __m256 acc[N]) {
  __m256 wv[4];
  for (int i = 0; i < 4; ++i) wv[i] = w.eight(row, b * BLOCK + 8 * i);
  for (int i = 0; i < 4; ++i)
    for (int n = 0; n < N; ++n) acc[n] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(x.block(n, b) + 8 * i), acc[n]);
}

template <int N>
inline void accumulate(const Q8Weights& w, int64_t row, int64_t b, const FloatRows& x, __m256 acc[N]) {
  __m256 wv[4];
  w.eights(row, b, wv);
  const __m256 scale = _mm256_set1_ps(w.scale(row, b));
  for (int n = 0; n < N; ++n) {
    const float* xb = x.block(n, b);
    __m256 dot = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xb));
    for (int i = 1; i < 4; ++i) dot = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xb + 8 * i), dot);
    acc[n] = _mm256_fmadd_ps(dot, scale, acc[n]);
  }
}

template <int N, typename Dot>
inline void accumulate(const Q8Weights& w, int64_t row, int64_t b, const Q8Rows<Dot>& x, __m256 acc[N]) {
  const __m256i wq = _mm256_loadu_si256((const __m256i*)(w.q + row * w.K + b * BLOCK));
  const __m256i magnitudes = _mm256_sign_epi8(wq, wq);
  const float dw = w.scale(row, b);
  for (int n = 0; n < N; ++n) {
    const __m256i xq = _mm256_loadu_si256((const __m256i*)(x.q + n * x.K + b * BLOCK));
    const __m256 dot = _mm256_cvtepi32_ps(Dot::dot(magnitudes, _mm256_sign_epi8(xq, wq)));  // exact: |dot| < 2^17
    acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d[n * (x.K / BLOCK) + b]), dot, acc[n]);
  }
}

template <typename T>
inline void store(T* y, float v) { *y = static_cast<T>(v); }  // bfloat16/float16: round to nearest even

// Rows [r0, r0 + R) of W against activation rows [n0, n0 + N): R * N accumulators, each weight
// block converted once for the N rows; `next` is the first of the R rows to prefetch (or -1).
// y is [M, O].
template <int R, int N, typename W, typename X, typename Y>
inline void tile(const W& w, int64_t r0, int64_t next, const X& x, int64_t n0, int64_t K, const float* bias,
                 Y* y, int64_t O) {
  constexpr int64_t lines_per_block = (R * BLOCK * W::bytes_per_weight + LINE - 1) / LINE;
  const char* ahead = next >= 0 ? w.row_bytes(next) : nullptr;
  __m256 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm256_setzero_ps();
  const X xs = x.from(n0);
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    if (ahead) {  // the next tile is R * K contiguous weights: one block step's share of its lines
      for (int64_t l = 0; l < lines_per_block; ++l) _mm_prefetch(ahead + (b * lines_per_block + l) * LINE, _MM_HINT_T0);
      if constexpr (W::scaled) w.prefetch_scales(next, R, b);
    }
    for (int r = 0; r < R; ++r) accumulate<N>(w, r0 + r, b, xs, acc[r]);
  }
  if constexpr (!W::scaled) {
    for (int64_t k = K / BLOCK * BLOCK; k < K; k += 8)
      for (int r = 0; r < R; ++r) {
        const __m256 wv = w.eight(r0 + r, k);
        for (int n = 0; n < N; ++n) acc[r][n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs.x + n * K + k), acc[r][n]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n)
      store(y + (n0 + n) * O + r0 + r, hsum(acc[r][n]) + (bias ? bias[r0 + r] : 0.f));
}

// R rows against all M activation rows, in groups of N = min(4, 8 / R): R * N accumulators and
// the weights fit AVX2's sixteen registers. The next tile is prefetched on the first pass only.
template <int R, typename W, typename X, typename Y>
inline void rows(const W& w, int64_t r0, int64_t next, const X& x, int64_t M, int64_t K, const float* bias,
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

// Tiles [begin, end) of R rows, then (in the last call) the O % R rows left.
template <int R, typename W, typename X, typename Y>
inline void tile_range(const W& w, const X& x, int64_t M, int64_t K, int64_t O, const float* bias, Y* y,
                       int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) rows<R>(w, t * R, t + 1 < end ? (t + 1) * R : -1, x, M, K, bias, y, O);
  if (end == O / R)
    for (int64_t r = O / R * R; r < O; ++r) rows<1>(w, r, -1, x, M, K, bias, y, O);
}

// The instruction set a range is compiled for: the build's own (AVX2), or with VNNI for the
// int8 dot products. `flatten` inlines the whole range, so `Dot::dot` lands in a function
// compiled for its target.
template <typename X>
struct RangeIsa {
  template <int R, typename... A>
  static void run(const A&... a) { tile_range<R>(a...); }
};

template <>
struct RangeIsa<Q8Rows<AvxVnniDot>> {
  template <int R, typename... A>
  __attribute__((target("avxvnni"), flatten)) static void run(const A&... a) { tile_range<R>(a...); }
};

template <>
struct RangeIsa<Q8Rows<Avx512VnniDot>> {
  template <int R, typename... A>
  __attribute__((target("avx512vnni,avx512vl"), flatten)) static void run(const A&... a) { tile_range<R>(a...); }
};

template <int R, typename W, typename X, typename Y>
void matmul_tiles(const W& w, const X& x, int64_t M, int64_t K, int64_t O, const float* bias, Y* y) {
  const int64_t tiles = O / R;
  // At least ~64 KB of weights per task: small matrices are not split thinner than a thread
  // start costs.
  const int64_t grain = std::max<int64_t>(1, 65536 / (R * K * W::bytes_per_weight));
  if (tiles == 0) return RangeIsa<X>::template run<R>(w, x, M, K, O, bias, y, int64_t{0}, int64_t{0});
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    RangeIsa<X>::template run<R>(w, x, M, K, O, bias, y, begin, end);
  });
}

// Tiles of 8 weight rows for one activation row, 4 for two, 2 beyond: as many rows in flight
// (independent sums) as the registers hold.
template <typename W, typename X, typename Y>
void matmul(const W& w, const X& x, int64_t M, int64_t K, int64_t O, const float* bias, Y* y) {
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

// GGUF's Q8_0 quantization of `blocks` blocks of 32 floats: d = max|x| / 127, q = roundf(x / d)
// computed as x * (1 / d), rounding halves away from zero (roundf's rule, not the vector
// unit's default of halves to even).
void quantize_q8(const float* x, int64_t blocks, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.f), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  for (int64_t i = 0; i < blocks; ++i, x += BLOCK, q += BLOCK) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    const float scale = top / 127.f;
    d[i] = scale;
    const __m256 inverse = _mm256_set1_ps(scale != 0.f ? 1.f / scale : 0.f);
    __m256i n[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 s = _mm256_mul_ps(v[j], inverse);
      const __m256 whole = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(s, whole)), half, _CMP_GE_OQ);  // exact
      const __m256 away = _mm256_and_ps(up, _mm256_or_ps(_mm256_and_ps(sign, s), one));  // +-1 where |frac| >= 0.5
      n[j] = _mm256_cvtps_epi32(_mm256_add_ps(whole, away));
    }
    // packs interleave the 128-bit halves: the permutation puts the 32 bytes back in order
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

enum class Isa { avx2, avx_vnni, avx512_vnni };

Isa int8_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avxvnni")) return Isa::avx_vnni;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return Isa::avx512_vnni;
    return Isa::avx2;
  }();
  return isa;
}

template <typename W, typename Y>
void matmul_q8_rows(const W& w, const float* x, int64_t M, int64_t K, int64_t O, Y* y) {
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * K / BLOCK);
  quantize_q8(x, M * K / BLOCK, q.data(), d.data());
  switch (int8_isa()) {
    case Isa::avx_vnni: return matmul(w, Q8Rows<AvxVnniDot>{q.data(), d.data(), K}, M, K, O, nullptr, y);
    case Isa::avx512_vnni: return matmul(w, Q8Rows<Avx512VnniDot>{q.data(), d.data(), K}, M, K, O, nullptr, y);
    case Isa::avx2: return matmul(w, Q8Rows<Avx2Dot>{q.data(), d.data(), K}, M, K, O, nullptr, y);
  }
}

// The product in y's type, from float32 activations `xp`: `int8_rows` quantizes them first.
template <typename W, typename Y>
void product(const W& w, const float* xp, int64_t M, int64_t K, int64_t O, const float* bias, bool int8_rows, Y* y) {
  if constexpr (std::is_same_v<W, Q8Weights>) {
    if (int8_rows) return matmul_q8_rows(w, xp, M, K, O, y);
  }
  matmul(w, FloatRows{xp, K}, M, K, O, bias, y);
}

template <typename W>
torch::Tensor run(const W& w, const torch::Tensor& x_in, int64_t O, const c10::optional<torch::Tensor>& bias,
                  bool int8_rows = false) {
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
    case torch::kFloat32: product(w, xp, M, K, O, bp, int8_rows, y.data_ptr<float>()); break;
    case torch::kBFloat16: product(w, xp, M, K, O, bp, int8_rows, y.data_ptr<at::BFloat16>()); break;
    case torch::kFloat16: product(w, xp, M, K, O, bp, int8_rows, y.data_ptr<at::Half>()); break;
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
// `int8_activations`: quantize x to Q8_0 and multiply in int8 (see the top of this file).
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor scales, bool int8_activations) {
  check(x, qs, BLOCK);
  TORCH_CHECK(scales.is_contiguous() && scales.size(0) == qs.size(0) && scales.size(1) * BLOCK == qs.size(1),
              "q8_linear: one scale per block of 32 weights");
  const int64_t K = qs.size(1);
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return run(Q8Weights{qs.data_ptr<int8_t>(), sp, K}, x, qs.size(0), c10::nullopt, int8_activations);
}

// Which instructions the int8 dot products of `q8_linear` run on here.
std::string q8_int8_instructions() {
  switch (int8_isa()) {
    case Isa::avx_vnni: return "avx-vnni";
    case Isa::avx512_vnni: return "avx512-vnni";
    default: return "avx2";
  }
}

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
//   stays float32 (nothing stores it). A block's product is then an exact int32 dot product,
//   scaled by d_w * d_x and accumulated in float32 by FMA block after block, as GGUF's
//   reference does (see "the int8 arithmetic" below: eight weight rows per vector, so the
//   weight work is shared by the activation rows). The int8 dot runs on AVX-VNNI or AVX-512
//   VNNI where the CPU has them (chosen at run time), else on AVX2: the integers are exact
//   and the float arithmetic is the same, so every CPU gives the same bits.
//
// Memory: the rows of a tile are short streams (a 1024-wide int8 row is 16 cache lines), too
// short for the hardware prefetcher to ramp up, so while a tile is computed the next tile's
// bytes are prefetched, spread over its block steps (1.5x on the depth transformer's matrices).

// Built after common.h, as one unit with the other kernels (see there).
#include <cstring>
#include <utility>
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

template <int R, typename W, typename X, typename Y>
void matmul_tiles(const W& w, const X& x, int64_t M, int64_t K, int64_t O, const float* bias, Y* y) {
  const int64_t tiles = O / R;
  // At least ~64 KB of weights per task: small matrices are not split thinner than a thread
  // start costs.
  const int64_t grain = std::max<int64_t>(1, 65536 / (R * K * W::bytes_per_weight));
  if (tiles == 0) return tile_range<R>(w, x, M, K, O, bias, y, int64_t{0}, int64_t{0});
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    tile_range<R>(w, x, M, K, O, bias, y, begin, end);
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

// ---- Q8_0 weights times Q8_0 activations: the int8 arithmetic ----
//
// Eight weight rows at a time, one per 32-bit lane. A block's eight 32-byte rows are loaded
// and transposed (lane r of vector g holds bytes 4g..4g+3 of row r); each activation row's
// bytes 4g..4g+3 are broadcast against vector g, so eight dot-product steps leave the eight
// rows' exact int32 block dots in the eight lanes. No horizontal sum is needed, and the
// weight work (loads, transpose, scales) is shared by every activation row of the tile.
// Each output is GGUF's own sum, acc = fma(d_w * d_x, dot, acc) block after block
// (ggml_vec_dot_q8_0_q8_0 with the multiply-add fused): the same bits on every CPU, for any
// batch and thread count.

// out[g] lane r = v[r] lane g: an 8 x 8 transpose of 32-bit elements, in place.
inline void transpose8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);      // elements 0 1 | 4 5 of rows i, i+1
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);  // 2 3 | 6 7
  }
  for (int i = 0; i < 8; i += 4) {  // rows i..i+3: element e (low half) and e + 4 (high half)
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int g = 0; g < 4; ++g) {
    v[g] = _mm256_permute2x128_si256(u[g], u[g + 4], 0x20);
    v[g + 4] = _mm256_permute2x128_si256(u[g], u[g + 4], 0x31);
  }
}

// dot(acc, x, w) adds to each int32 lane the four products of x's bytes and w's, w as
// `weights` made it. AVX2's byte product takes one unsigned operand and saturates at 16 bits:
// it multiplies |w| (-128 read as 128) by x with w's signs, pairs of which fit (|x| <= 127).
// VNNI's does not saturate: it takes w + 128 (`offset`), and each activation block's
// 128 * sum(x), computed with its quantization, starts the sum negated.
struct Avx2Dot {
  static constexpr bool offset = false;
  static inline __m256i weights(__m256i w) { return w; }
  static inline __m256i dot(__m256i acc, __m256i x, __m256i w) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

struct VnniWeights {
  static constexpr bool offset = true;
  static inline __m256i weights(__m256i w) { return _mm256_xor_si256(w, _mm256_set1_epi8(-128)); }
};

struct AvxVnniDot : VnniWeights {
  __attribute__((target("avxvnni"))) static inline __m256i dot(__m256i acc, __m256i x, __m256i w) {
    return _mm256_dpbusd_avx_epi32(acc, w, x);
  }
};

struct Avx512VnniDot : VnniWeights {
  __attribute__((target("avx512vnni,avx512vl"))) static inline __m256i dot(__m256i acc, __m256i x, __m256i w) {
    return _mm256_dpbusd_epi32(acc, w, x);
  }
};

// Activations quantized to Q8_0: int8 [M, K], one float32 scale per block of 32, and for an
// `offset` dot each block's -128 * sum(x).
struct Int8Rows {
  const int8_t* q;
  const float* d;
  const int32_t* offsets;
  int64_t K;
};

// The eight rows of a tile: their weights and scales, or zeros past the matrix's last row.
struct TileRows {
  const int8_t* q[8];
  const uint16_t* scales[8];
};

TileRows tile_rows(const Q8Weights& w, int64_t r0, int64_t O, const int8_t* zero_q, const uint16_t* zero_scales) {
  TileRows t;
  for (int r = 0; r < 8; ++r) {
    t.q[r] = r0 + r < O ? w.q + (r0 + r) * w.K : zero_q;
    t.scales[r] = r0 + r < O ? w.scales + (r0 + r) * (w.K / BLOCK) : zero_scales;
  }
  return t;
}

// The float32 scales of blocks b..b+count-1 of the tile's rows: out[i][r] for block b + i.
inline void tile_scales(const TileRows& t, int64_t b, int64_t count, float out[8][8]) {
  if (count < 8) {
    for (int64_t i = 0; i < count; ++i)
      for (int r = 0; r < 8; ++r) out[i][r] = _cvtsh_ss(t.scales[r][b + i]);
    return;
  }
  __m256i v[8];
  for (int r = 0; r < 8; ++r)
    v[r] = _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(t.scales[r] + b))));
  transpose8(v);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out[i], _mm256_castsi256_ps(v[i]));
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The eight rows' block dots against one activation block x, lane r for row r, from rows as
// loaded (not transposed): each row's dot in eight lanes of four, summed across by a tree of
// horizontal adds. For a single activation row this costs fewer instructions than the
// transpose, which only pays when several rows share it; the integers are the same.
template <typename Dot>
inline __m256i untransposed_dots(const __m256i w[8], __m256i x) {
  __m256i d[8];
  for (int r = 0; r < 8; ++r) d[r] = Dot::dot(_mm256_setzero_si256(), x, w[r]);
  const __m256i low = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
  const __m256i high = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
  // low: rows 0-3 over bytes 0-15 | rows 0-3 over bytes 16-31; high: rows 4-7 likewise
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20), _mm256_permute2x128_si256(low, high, 0x31));
}

// One tile of eight weight rows from r0 against activation rows [n0, n0 + N); `next` (or
// nullptr) is the following tile, prefetched a line per row every other block.
template <int N, typename Dot, typename Y>
inline void int8_tile(const TileRows& t, const TileRows* next, const Int8Rows& x, int64_t n0, int64_t r0,
                      int64_t O, Y* y) {
  const int64_t K = x.K, blocks = K / BLOCK;
  __m256 acc[N];
  for (int n = 0; n < N; ++n) acc[n] = _mm256_setzero_ps();
  float scales[8][8];  // [block % 8][row]
  for (int64_t b = 0; b < blocks; ++b) {
    if (b % 8 == 0) tile_scales(t, b, std::min<int64_t>(8, blocks - b), scales);
    if (next && b % 2 == 0)
      for (int r = 0; r < 8; ++r) _mm_prefetch((const char*)(next->q[r] + b * BLOCK), _MM_HINT_T0);
    if (next && b % 32 == 0)
      for (int r = 0; r < 8; ++r) _mm_prefetch((const char*)(next->scales[r] + b), _MM_HINT_T0);
    __m256i v[8];
    for (int r = 0; r < 8; ++r) v[r] = Dot::weights(_mm256_loadu_si256((const __m256i*)(t.q[r] + b * BLOCK)));
    if constexpr (N > 1) transpose8(v);
    const __m256 dw = _mm256_loadu_ps(scales[b % 8]);
    for (int n = 0; n < N; ++n) {
      const int8_t* xb = x.q + (n0 + n) * K + b * BLOCK;
      // Integer sums are exact in any order: two chains, short enough to overlap.
      __m256i even = Dot::offset ? _mm256_set1_epi32(x.offsets[(n0 + n) * blocks + b]) : _mm256_setzero_si256();
      if constexpr (N == 1) {
        even = _mm256_add_epi32(even, untransposed_dots<Dot>(v, _mm256_loadu_si256((const __m256i*)xb)));
      } else {
        __m256i odd = _mm256_setzero_si256();
        for (int g = 0; g < 8; g += 2) {
          even = Dot::dot(even, broadcast4(xb + 4 * g), v[g]);
          odd = Dot::dot(odd, broadcast4(xb + 4 * g + 4), v[g + 1]);
        }
        even = _mm256_add_epi32(even, odd);
      }
      const __m256i dot = even;
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[(n0 + n) * blocks + b]));
      acc[n] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[n]);  // exact: |dot| < 2^20
    }
  }
  for (int n = 0; n < N; ++n) {
    float out[8];
    _mm256_storeu_ps(out, acc[n]);
    for (int r = 0; r < 8 && r0 + r < O; ++r) store(y + (n0 + n) * O + r0 + r, out[r]);
  }
}

// Tiles [begin, end) against all M activation rows, four at a time.
template <typename Dot, typename Y>
void int8_tiles(const Q8Weights& w, const Int8Rows& x, int64_t M, int64_t O, Y* y, const int8_t* zero_q,
                const uint16_t* zero_scales, int64_t begin, int64_t end) {
  for (int64_t tile = begin; tile < end; ++tile) {
    const TileRows t = tile_rows(w, tile * 8, O, zero_q, zero_scales);
    const TileRows following = tile_rows(w, (tile + 1) * 8, O, zero_q, zero_scales);
    const TileRows* next = tile + 1 < end ? &following : nullptr;
    int64_t n = 0;
    for (; n + 4 <= M; n += 4) int8_tile<4, Dot>(t, n == 0 ? next : nullptr, x, n, tile * 8, O, y);
    next = n == 0 ? next : nullptr;
    switch (M - n) {
      case 3: int8_tile<3, Dot>(t, next, x, n, tile * 8, O, y); break;
      case 2: int8_tile<2, Dot>(t, next, x, n, tile * 8, O, y); break;
      case 1: int8_tile<1, Dot>(t, next, x, n, tile * 8, O, y); break;
    }
  }
}

// `int8_tiles` compiled for the dot's instructions: `flatten` inlines the whole range, so
// `Dot::dot` lands in a function compiled for its target.
template <typename Dot>
struct Int8Isa {
  template <typename... A>
  static void run(const A&... a) { int8_tiles<Dot>(a...); }
};

template <>
struct Int8Isa<AvxVnniDot> {
  template <typename... A>
  __attribute__((target("avxvnni"), flatten)) static void run(const A&... a) { int8_tiles<AvxVnniDot>(a...); }
};

template <>
struct Int8Isa<Avx512VnniDot> {
  template <typename... A>
  __attribute__((target("avx512vnni,avx512vl"), flatten)) static void run(const A&... a) {
    int8_tiles<Avx512VnniDot>(a...);
  }
};

template <typename Dot, typename Y>
void matmul_int8(const Q8Weights& w, const float* xf, int64_t M, int64_t K, int64_t O, Y* y) {
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * K / BLOCK);
  quantize_q8(xf, M * K / BLOCK, q.data(), d.data());
  std::vector<int32_t> offsets(Dot::offset ? M * K / BLOCK : 0);
  for (size_t i = 0; i < offsets.size(); ++i) {
    int32_t sum = 0;
    for (int64_t j = 0; j < BLOCK; ++j) sum += q[i * BLOCK + j];
    offsets[i] = -128 * sum;
  }
  const Int8Rows x{q.data(), d.data(), offsets.data(), K};
  std::vector<int8_t> zero_q(O % 8 ? K : 0);  // the rows a last, partial tile lacks
  std::vector<uint16_t> zero_scales(O % 8 ? K / BLOCK : 0);
  const int64_t tiles = (O + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, 65536 / (8 * K));  // at least ~64 KB of weights per task
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    Int8Isa<Dot>::run(w, x, M, O, y, zero_q.data(), zero_scales.data(), begin, end);
  });
}

enum class Isa { avx2, avx_vnni, avx512_vnni };

bool has(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx_vnni: return __builtin_cpu_supports("avxvnni");
    case Isa::avx512_vnni: return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
    default: return true;
  }
}

Isa& int8_isa() {
  static Isa isa = has(Isa::avx_vnni) ? Isa::avx_vnni : has(Isa::avx512_vnni) ? Isa::avx512_vnni : Isa::avx2;
  return isa;
}

constexpr std::pair<Isa, const char*> ISA_NAMES[] = {
    {Isa::avx2, "avx2"}, {Isa::avx_vnni, "avx-vnni"}, {Isa::avx512_vnni, "avx512-vnni"}};

template <typename W, typename Y>
void matmul_q8_rows(const W& w, const float* x, int64_t M, int64_t K, int64_t O, Y* y) {
  switch (int8_isa()) {
    case Isa::avx_vnni: return matmul_int8<AvxVnniDot>(w, x, M, K, O, y);
    case Isa::avx512_vnni: return matmul_int8<Avx512VnniDot>(w, x, M, K, O, y);
    case Isa::avx2: return matmul_int8<Avx2Dot>(w, x, M, K, O, y);
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

// GGUF's Q8_0 of a float32, bfloat16 or float16 matrix [O, K] (K a multiple of 32): int8 values
// and float16 scales, the bits ggml's quantize_row_q8_0_ref writes: `quantize_q8`'s rule, the
// float32 scale rounded to float16 (nearest even) as it is stored. Rows run in parallel, at
// memory speed: converting a 7B checkpoint at load takes seconds.
std::vector<torch::Tensor> quantize_q8_0(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % BLOCK == 0, "quantize_q8_0: a matrix whose rows are blocks of 32");
  const auto w = weight.contiguous();
  const int64_t O = w.size(0), K = w.size(1), blocks = K / BLOCK;
  auto qs = torch::empty({O, K}, w.options().dtype(torch::kInt8));
  auto scales = torch::empty({O, blocks}, w.options().dtype(torch::kFloat16));
  int8_t* q = qs.data_ptr<int8_t>();
  auto* sp = reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>());
  const auto type = w.scalar_type();
  TORCH_CHECK(type == torch::kFloat32 || type == torch::kBFloat16 || type == torch::kFloat16,
              "quantize_q8_0: the matrix must be float32, bfloat16 or float16");
  at::parallel_for(0, O, std::max<int64_t>(1, 65536 / K), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer, d(blocks);
    for (int64_t r = begin; r < end; ++r) {
      const float* x = type == torch::kFloat32 ? w.data_ptr<float>() + r * K
                       : type == torch::kBFloat16 ? widen(w.data_ptr<at::BFloat16>() + r * K, K, buffer)
                                                  : widen(w.data_ptr<at::Half>() + r * K, K, buffer);
      quantize_q8(x, blocks, q + r * K, d.data());
      for (int64_t b = 0; b < blocks; ++b) sp[r * blocks + b] = _cvtss_sh(d[b], _MM_FROUND_TO_NEAREST_INT);
    }
  });
  return {qs, scales};
}

// Which instructions the int8 dot products of `q8_linear` run on here.
std::string q8_int8_instructions() {
  for (const auto& [isa, name] : ISA_NAMES)
    if (isa == int8_isa()) return name;
  return "";
}

// Run the int8 dot products on `name` ("avx2", "avx-vnni", "avx512-vnni") from now on, if this
// CPU has it (tests cover every path a CPU can run this way); returns what runs.
std::string q8_use_int8_instructions(const std::string& name) {
  for (const auto& [isa, known] : ISA_NAMES)
    if (name == known && has(isa)) int8_isa() = isa;
  return q8_int8_instructions();
}

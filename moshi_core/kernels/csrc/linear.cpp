// Matrix products with few activation rows ("skinny"), y[M, O] = x[M, K] W[O, K]^T (+ bias),
// for x86-64 CPUs with AVX2, FMA and F16C.
//
// A streaming step multiplies a handful of rows (one per conversation) by every weight of the
// model once: the cost is reading the weights. PyTorch's CPU GEMMs pack the weight matrix for
// each call of more than one row, and its bfloat16 path converts through a slow route; here
// each weight is read once, converted in registers, and used for every activation row while
// it is there.
//
// Weights: float32, bfloat16, float16 [O, K], or Q8_0 in tiles (see "Q8_0 tiles" below: int8
// values with one float16 scale per block of 32 along K, laid out at load so that a step reads
// them as one stream). Every output is the same sum in the same order whatever M and the
// thread count are, so a row's result does not depend on what it is batched with.
//
// Q8_0 weights take float32 or int8 activations:
// - float32 ("strict"): each block's exact int8 values times the float activations, summed in
//   float32, then times the block's scale (an int8 times a float16 fits float32: these are the
//   dequantized weights' products, to float32 summation order).
// - int8 (GGUF runtimes' arithmetic, llama.cpp's ggml_vec_dot_q8_0_q8_0): each activation row
//   is quantized to Q8_0 as GGUF's reference quantize_row_q8_0 does, except that its scale
//   stays float32 (nothing stores it). A block's product is then an exact int32 dot product,
//   scaled by d_w * d_x and accumulated in float32 by FMA block after block, as GGUF's
//   reference does. The int8 dot runs on AVX-512 VNNI or AVX-VNNI where the CPU has them
//   (chosen at run time), else on AVX2: the integers are exact and the float arithmetic is the
//   same, so every CPU gives the same bits.
//
// Memory: a float tile's rows are short streams (a 1024-wide bfloat16 row is 32 cache lines),
// too short for the hardware prefetcher to ramp up, so while a tile is computed the next
// tile's bytes are prefetched, spread over its block steps (1.5x on the depth transformer's
// matrices). A Q8_0 tile is one contiguous stream, prefetched a few blocks ahead.

// Built after common.h, as one unit with the other kernels (see there).
#include <atomic>
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

// A float weight format yields eight weights of a row as a vector of eight floats (`eight`).
template <typename T, int64_t Bytes>
struct FloatWeights {
  static constexpr int64_t bytes_per_weight = Bytes;
  const T* w;
  int64_t K;
  const char* row_bytes(int64_t row) const { return reinterpret_cast<const char*>(w + row * K); }
};

// K need only be a multiple of 8: the columns past the last whole block are read eight at a time.
struct F32Weights : FloatWeights<float, 4> {
  inline __m256 eight(int64_t row, int64_t k) const { return _mm256_loadu_ps(w + row * K + k); }
};

struct BF16Weights : FloatWeights<uint16_t, 2> {
  inline __m256 eight(int64_t row, int64_t k) const { return bf16x8(w + row * K + k); }
};

struct F16Weights : FloatWeights<uint16_t, 2> {
  inline __m256 eight(int64_t row, int64_t k) const { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + row * K + k))); }
};

// Block b of weight row `row` against N activation rows: acc[n] += their products.
template <int N, typename W>
inline void accumulate(const W& w, int64_t row, int64_t b, const FloatRows& x, __m256 acc[N]) {
  __m256 wv[4];
  for (int i = 0; i < 4; ++i) wv[i] = w.eight(row, b * BLOCK + 8 * i);
  for (int i = 0; i < 4; ++i)
    for (int n = 0; n < N; ++n) acc[n] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(x.block(n, b) + 8 * i), acc[n]);
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
    }
    for (int r = 0; r < R; ++r) accumulate<N>(w, r0 + r, b, xs, acc[r]);
  }
  for (int64_t k = K / BLOCK * BLOCK; k < K; k += 8)
    for (int r = 0; r < R; ++r) {
      const __m256 wv = w.eight(r0 + r, k);
      for (int n = 0; n < N; ++n) acc[r][n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs.x + n * K + k), acc[r][n]);
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

// body(begin, end) over [0, n) in chunks of `grain`, each thread taking the next chunk as it
// comes free. On a shared host one core often runs slower than the other for a while; with an
// even split the faster one waits at the join for the other's half. Measured on a 2-core Xeon:
// a streamed Mimi frame (float32 matrices of 1-16 MB) 3-6% faster at p50 and 7-8% at p95,
// alternating in one process; the 7B bfloat16 step 754-764 -> 608-612 ms, alternating
// processes (one activation row: 16 -> 23 GB/s, where the read gives 25). The 8-bit tiles
// keep the even split: over 7B-shaped matrices these chunks made them 5% slower.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& body) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(chunks, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) return body(int64_t{0}, n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) body(c * grain, std::min(n, (c + 1) * grain));
  });
}

template <int R, typename W, typename X, typename Y>
void matmul_tiles(const W& w, const X& x, int64_t M, int64_t K, int64_t O, const float* bias, Y* y) {
  const int64_t tiles = O / R;
  // At least ~64 KB of weights per task: small matrices are not split thinner than a thread
  // start costs.
  const int64_t grain = std::max<int64_t>(1, 65536 / (R * K * W::bytes_per_weight));
  if (tiles == 0) return tile_range<R>(w, x, M, K, O, bias, y, int64_t{0}, int64_t{0});
  parallel_chunks(tiles, grain, [&](int64_t begin, int64_t end) {
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

// ---- Q8_0 tiles ----
//
// A Q8_0 matrix is laid out at load (moshi_core/kernels/q8.py, `TiledQ8Weight`) in tiles of
// 16 rows: int8 [O / 16, K / 32, 512] and float16 scales [O / 16, K / 32, 16], O padded with
// zero rows to a multiple of 16. In block b of a tile, byte 64 g + 4 r + j is byte 4 g + j of
// row r's block b: lane r (32 bits) of the block's 64-byte vector g holds four consecutive
// weights of row r, and the block's 16 scales follow each other. So a step reads a tile as one
// contiguous stream (the hardware prefetcher's best case), and no shuffle runs: four
// activation bytes broadcast against vector g, one dot-product instruction adds four products
// to each row's lane. AVX-512 takes a vector whole (16 rows), AVX2 as two halves of 8.

constexpr int64_t TILE = 16;                      // rows per tile
constexpr int64_t TILE_BLOCK = TILE * BLOCK;      // bytes of a tile's block
constexpr int64_t PREFETCH_BLOCKS = 4;            // how far ahead of the stream to prefetch

struct Q8Tiles {
  const int8_t* q;
  const uint16_t* scales;  // float16 bits
  int64_t K;
  int64_t blocks() const { return K / BLOCK; }
  const int8_t* tile(int64_t t) const { return q + t * TILE * K; }
  const uint16_t* tile_scales(int64_t t) const { return scales + t * TILE * blocks(); }
};

// The vector widths: `lanes` 32-bit lanes, one weight row each.
struct Ymm {
  using I = __m256i;
  using F = __m256;
  static constexpr int lanes = 8;
  static I load(const int8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static I broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I flip(I w) { return _mm256_xor_si256(w, _mm256_set1_epi8(-128)); }  // w + 128 as unsigned bytes
  static F scales(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
struct Zmm {
  using I = __m512i;
  using F = __m512;
  static constexpr int lanes = 16;
  AVX512 static I load(const int8_t* p) { return _mm512_loadu_si512((const void*)p); }
  AVX512 static I broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  AVX512 static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  AVX512 static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  AVX512 static I flip(I w) { return _mm512_xor_si512(w, _mm512_set1_epi8(-128)); }
  AVX512 static F scales(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  AVX512 static F zero() { return _mm512_setzero_ps(); }
  AVX512 static F set1(float v) { return _mm512_set1_ps(v); }
  AVX512 static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  AVX512 static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  AVX512 static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  AVX512 static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};

// Byte j of each 32-bit lane as a float: shifted to the top, then back down with its sign.
template <int J>
inline __m256 lane_byte(__m256i v) {
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * J), 24));
}

// Strict: one float activation row against tile t, eight rows (half h) at a time; four sums,
// one per byte position of a lane, keep four multiply-add chains in flight.
template <typename Y>
void float_tile(const Q8Tiles& w, int64_t t, const float* x, Y* y, int64_t O) {
  for (int64_t h = 0; h < TILE / Ymm::lanes; ++h) {
    __m256 acc = _mm256_setzero_ps();
    const int8_t* q = w.tile(t) + 4 * Ymm::lanes * h;
    const uint16_t* s = w.tile_scales(t) + Ymm::lanes * h;
    for (int64_t b = 0; b < w.blocks(); ++b, q += TILE_BLOCK, s += TILE) {
      __m256 d[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int g = 0; g < 8; ++g) {
        const __m256i v = Ymm::load(q + 4 * TILE * g);
        const float* xg = x + b * BLOCK + 4 * g;
        d[0] = _mm256_fmadd_ps(lane_byte<0>(v), _mm256_set1_ps(xg[0]), d[0]);
        d[1] = _mm256_fmadd_ps(lane_byte<1>(v), _mm256_set1_ps(xg[1]), d[1]);
        d[2] = _mm256_fmadd_ps(lane_byte<2>(v), _mm256_set1_ps(xg[2]), d[2]);
        d[3] = _mm256_fmadd_ps(lane_byte<3>(v), _mm256_set1_ps(xg[3]), d[3]);
      }
      const __m256 dot = _mm256_add_ps(_mm256_add_ps(d[0], d[1]), _mm256_add_ps(d[2], d[3]));
      acc = _mm256_fmadd_ps(dot, Ymm::scales(s), acc);
    }
    float out[Ymm::lanes];
    _mm256_storeu_ps(out, acc);
    for (int64_t r = 0; r < Ymm::lanes && t * TILE + h * Ymm::lanes + r < O; ++r) store(y + t * TILE + h * Ymm::lanes + r, out[r]);
  }
}

template <typename Y>
void matmul_float_tiles(const Q8Tiles& w, const float* x, int64_t M, int64_t O, Y* y) {
  const int64_t tiles = (O + TILE - 1) / TILE;
  at::parallel_for(0, tiles, std::max<int64_t>(1, 65536 / (TILE * w.K)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t n = 0; n < M; ++n) float_tile(w, t, x + n * w.K, y + n * O, O);
  });
}

// int8: dot(acc, x, w) adds to each int32 lane the four products of x's bytes and w's, w as
// `weights` made it. AVX2's byte product takes one unsigned operand and saturates at 16 bits:
// it multiplies |w| (-128 read as 128) by x with w's signs, pairs of which fit (|x| <= 127).
// VNNI's does not saturate: it takes w + 128 (`offset`), and each activation block's
// -128 * sum(x), computed with its quantization, starts the sum.
struct Avx2Dot {
  using Vec = Ymm;
  static constexpr bool offset = false;
  static __m256i weights(__m256i w) { return w; }
  static __m256i dot(__m256i acc, __m256i x, __m256i w) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

struct AvxVnniDot {
  using Vec = Ymm;
  static constexpr bool offset = true;
  static __m256i weights(__m256i w) { return Ymm::flip(w); }
  __attribute__((target("avxvnni"))) static __m256i dot(__m256i acc, __m256i x, __m256i w) {
    return _mm256_dpbusd_avx_epi32(acc, w, x);
  }
};

struct Avx512VnniDot {
  using Vec = Zmm;
  static constexpr bool offset = true;
  AVX512 static __m512i weights(__m512i w) { return Zmm::flip(w); }
  AVX512 static __m512i dot(__m512i acc, __m512i x, __m512i w) { return _mm512_dpbusd_epi32(acc, w, x); }
};

// Activations quantized to Q8_0: int8 [M, K], one float32 scale per block of 32, and for an
// `offset` dot each block's -128 * sum(x).
struct Int8Rows {
  const int8_t* q;
  const float* d;
  const int32_t* offsets;
  int64_t K;
};

// Tile t against activation rows [n0, n0 + N). Each output is GGUF's own sum, acc = fma(d_w *
// d_x, dot, acc) block after block (ggml_vec_dot_q8_0_q8_0 with the multiply-add fused): the
// same bits on every CPU, for any batch and thread count.
template <int N, typename Dot, typename Y>
inline void int8_tile(const Q8Tiles& w, int64_t t, const Int8Rows& x, int64_t n0, int64_t O, Y* y) {
  using V = typename Dot::Vec;
  constexpr int parts = TILE / V::lanes;
  const int64_t K = w.K, blocks = w.blocks();
  const int8_t* q = w.tile(t);
  const uint16_t* s = w.tile_scales(t);
  typename V::F acc[parts][N];
  for (int p = 0; p < parts; ++p)
    for (int n = 0; n < N; ++n) acc[p][n] = V::zero();
  for (int64_t b = 0; b < blocks; ++b, q += TILE_BLOCK, s += TILE) {
    for (int64_t l = 0; l < TILE_BLOCK; l += LINE) _mm_prefetch((const char*)q + PREFETCH_BLOCKS * TILE_BLOCK + l, _MM_HINT_T0);
    _mm_prefetch((const char*)(s + PREFETCH_BLOCKS * TILE), _MM_HINT_T0);
    for (int p = 0; p < parts; ++p) {
      const typename V::F dw = V::scales(s + p * V::lanes);
      // Integer sums are exact in any order: two chains per row, short enough to overlap.
      typename V::I even[N], odd[N];
      for (int n = 0; n < N; ++n) {
        even[n] = V::set1(Dot::offset ? x.offsets[(n0 + n) * blocks + b] : 0);
        odd[n] = V::set1(0);
      }
      for (int g = 0; g < 8; g += 2) {
        const typename V::I w0 = Dot::weights(V::load(q + 4 * TILE * g + 4 * V::lanes * p));
        const typename V::I w1 = Dot::weights(V::load(q + 4 * TILE * (g + 1) + 4 * V::lanes * p));
        for (int n = 0; n < N; ++n) {
          const int8_t* xb = x.q + (n0 + n) * K + b * BLOCK + 4 * g;
          even[n] = Dot::dot(even[n], V::broadcast4(xb), w0);
          odd[n] = Dot::dot(odd[n], V::broadcast4(xb + 4), w1);
        }
      }
      for (int n = 0; n < N; ++n) {
        const typename V::F scale = V::mul(dw, V::set1(x.d[(n0 + n) * blocks + b]));
        acc[p][n] = V::fma(scale, V::to_float(V::add(even[n], odd[n])), acc[p][n]);  // exact: |dot| < 2^20
      }
    }
  }
  for (int p = 0; p < parts; ++p)
    for (int n = 0; n < N; ++n) {
      float out[V::lanes];
      V::store(out, acc[p][n]);
      const int64_t r0 = t * TILE + p * V::lanes;
      for (int64_t r = 0; r < V::lanes && r0 + r < O; ++r) store(y + (n0 + n) * O + r0 + r, out[r]);
    }
}

// Tiles [begin, end) against all M activation rows, four at a time (a tile's bytes are still
// in the core's cache for the next four).
template <typename Dot, typename Y>
void int8_tiles(const Q8Tiles& w, const Int8Rows& x, int64_t M, int64_t O, Y* y, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    int64_t n = 0;
    for (; n + 4 <= M; n += 4) int8_tile<4, Dot>(w, t, x, n, O, y);
    switch (M - n) {
      case 3: int8_tile<3, Dot>(w, t, x, n, O, y); break;
      case 2: int8_tile<2, Dot>(w, t, x, n, O, y); break;
      case 1: int8_tile<1, Dot>(w, t, x, n, O, y); break;
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
  AVX512 __attribute__((flatten)) static void run(const A&... a) { int8_tiles<Avx512VnniDot>(a...); }
};
#undef AVX512

template <typename Dot, typename Y>
void matmul_int8(const Q8Tiles& w, const float* xf, int64_t M, int64_t O, Y* y) {
  const int64_t K = w.K;
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
  const int64_t grain = std::max<int64_t>(1, 65536 / (TILE * K));  // at least ~64 KB of weights per task
  at::parallel_for(0, (O + TILE - 1) / TILE, grain, [&](int64_t begin, int64_t end) {
    Int8Isa<Dot>::run(w, x, M, O, y, begin, end);
  });
}

enum class Isa { avx2, avx_vnni, avx512_vnni };

bool has(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx_vnni: return __builtin_cpu_supports("avxvnni");
    case Isa::avx512_vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    default: return true;
  }
}

// The widest first: with the tiles, a 64-byte vector is a whole tile's block row.
Isa& int8_isa() {
  static Isa isa = has(Isa::avx512_vnni) ? Isa::avx512_vnni : has(Isa::avx_vnni) ? Isa::avx_vnni : Isa::avx2;
  return isa;
}

constexpr std::pair<Isa, const char*> ISA_NAMES[] = {
    {Isa::avx2, "avx2"}, {Isa::avx_vnni, "avx-vnni"}, {Isa::avx512_vnni, "avx512-vnni"}};

template <typename Y>
void matmul_q8(const Q8Tiles& w, const float* x, int64_t M, int64_t O, bool int8_rows, Y* y) {
  if (!int8_rows) return matmul_float_tiles(w, x, M, O, y);
  switch (int8_isa()) {
    case Isa::avx512_vnni: return matmul_int8<Avx512VnniDot>(w, x, M, O, y);
    case Isa::avx_vnni: return matmul_int8<AvxVnniDot>(w, x, M, O, y);
    case Isa::avx2: return matmul_int8<Avx2Dot>(w, x, M, O, y);
  }
}

// The product in y's type, from float32 activations `xp`: Q8_0 tiles in int8 if `int8_rows`.
template <typename W, typename Y>
void product(const W& w, const float* xp, int64_t M, int64_t K, int64_t O, const float* bias, bool int8_rows, Y* y) {
  if constexpr (std::is_same_v<W, Q8Tiles>) {
    matmul_q8(w, xp, M, O, int8_rows, y);
  } else {
    matmul(w, FloatRows{xp, K}, M, K, O, bias, y);
  }
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

// y = x W^T for a Q8_0 W of `rows` rows in tiles (see "Q8_0 tiles"): int8 [tiles, K / 32,
// 512] and float16 scales [tiles, K / 32, 16]; y [M, rows] has x's dtype.
// `int8_activations`: quantize x to Q8_0 and multiply in int8 (see the top of this file).
torch::Tensor q8_tiles_linear(torch::Tensor x, torch::Tensor tiles, torch::Tensor scales, int64_t rows,
                              bool int8_activations) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.size(2) == TILE_BLOCK && tiles.is_contiguous(),
              "q8_tiles_linear: the tiles must be int8 [tiles, K / 32, 512]");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == tiles.size(0) && scales.size(1) == tiles.size(1) &&
              scales.size(2) == TILE && scales.is_contiguous(), "q8_tiles_linear: one scale per tile row and block");
  const int64_t K = tiles.size(1) * BLOCK;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "q8_tiles_linear: shapes do not match");
  TORCH_CHECK(rows > (tiles.size(0) - 1) * TILE && rows <= tiles.size(0) * TILE, "q8_tiles_linear: ", rows,
              " rows do not fill ", tiles.size(0), " tiles");
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return run(Q8Tiles{tiles.data_ptr<int8_t>(), sp, K}, x, rows, c10::nullopt, int8_activations);
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

// Which instructions the int8 dot products of `q8_tiles_linear` run on here.
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

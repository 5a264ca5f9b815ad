// The codes of a residual vector quantizer for a streaming step's few rows: at each level the
// nearest centroid to the residual, the one Kyutai's `torch.cdist` picks, bit for bit.
//
// cdist computes a level's squared distances as one float32 matrix product of padded rows,
// [-2r, |r|^2, 1] . [e, 1, |e|^2], which reads the level's whole table (2048 x 258 floats, 2 MB)
// at the speed of PyTorch's one-row product. Here a level reads a float16 copy of the
// centroids instead (half the bytes, through the skinny kernel), and the float32 arithmetic
// runs only where it decides something:
// 1. Coarse distances from the float16 centroids. Each is within a bound B_j of the value
//    cdist's product gives (the float16 rounding, 2^-11 of each weight or 2^-25 below the
//    normal range, plus the float32 rounding of both sums in any order, gamma_K of the sum of
//    the absolute products, bounded by (|r| + |e_j|)^2). The centroids whose lower bound is
//    below the least upper bound are the candidates; the one cdist picks is among them.
// 2. The candidates' distances in float32 (in our summation order, so within gamma_K of
//    cdist's on each side). Where one of them is below every other by more than both bounds
//    and by a relative 2^-20 (so that not even the square root cdist takes can tie them), it is
//    cdist's choice. Anything else (a near tie, a distance near zero, a value not finite) sends
//    the whole level to cdist's own arithmetic, the matrix product through PyTorch.
// On the bench's Mimi (random weights, codebooks calibrated on speech; 16 s of speech) 6% of
// the levels needed that product, nearly all of them the first of a quantizer (a fifth of
// those), where the residual is close to a centroid and float32's rounding decides.

// Built after the other kernels, as one unit with them (see common.h).
#include <cmath>
#include <limits>

namespace {

// gamma_K (K u / (1 - K u), u = 2^-24) for sums of up to 258 terms, rounded up.
constexpr float GAMMA = 260.f / 16777216.f;
// Slack on every bound for the rounding of the bound's own float arithmetic.
constexpr float SLACK = 1.f + 1.f / 1024.f;
// A separation that the square roots keep: a relative gap of 2^-20 is many units in the last place.
constexpr float APART = 1.f + 1.f / 1048576.f;

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  float sum = hsum(acc);
  for (; k < n; ++k) sum = std::fma(a[k], b[k], sum);
  return sum;
}

// The centroid cdist picks for one query row, or -1 where that takes cdist's own product.
// coarse: the row's float16 distances without the norms; query: [-2r, |r|^2, 1];
// padded: the level's [bins, D + 2] float32 table; norms: |e_j|; rl1 = sum |r_k|.
int64_t decide(const float* coarse, const float* query, const float* padded, const float* norms, int64_t bins,
               int64_t D, float rl1, std::vector<float>& lower, std::vector<int64_t>& candidates) {
  const float r2 = query[D], r = std::sqrt(r2);
  const int64_t width = D + 2;
  float least_upper = std::numeric_limits<float>::infinity();
  lower.resize(bins);
  for (int64_t j = 0; j < bins; ++j) {
    const float e = norms[j], spread = (r + e) * (r + e);
    const float distance = coarse[j] + padded[j * width + D + 1] + r2;
    const float bound = (r * e / 1024.f + rl1 / 16777216.f + 2.f * GAMMA * spread) * SLACK;
    if (!std::isfinite(distance) || !std::isfinite(bound)) return -1;
    lower[j] = distance - bound;
    least_upper = std::min(least_upper, distance + bound);
  }
  if (!(least_upper >= 0.f)) return -1;
  const float cut = least_upper * APART;
  candidates.clear();
  for (int64_t j = 0; j < bins; ++j)
    if (lower[j] <= cut) candidates.push_back(j);
  int64_t best = -1;
  float best_distance = 0.f, best_high = 0.f;
  std::vector<float>& low = lower;  // reused: the candidates' float32 lower bounds
  for (size_t c = 0; c < candidates.size(); ++c) {
    const int64_t j = candidates[c];
    const float e = norms[j], error = 2.f * GAMMA * (r + e) * (r + e) * SLACK;  // ours and cdist's
    const float distance = dot(query, padded + j * width, width);
    if (!std::isfinite(distance)) return -1;
    low[c] = distance - error;
    if (best < 0 || distance < best_distance) best = static_cast<int64_t>(c), best_distance = distance, best_high = distance + error;
  }
  const float floor = std::max(best_high, 0.f) * APART;
  for (size_t c = 0; c < candidates.size(); ++c)
    if (static_cast<int64_t>(c) != best && !(low[c] > floor && low[c] > 0.f)) return -1;
  return candidates[best];
}

}  // namespace

// Codes [N, levels] of residuals x [N, D] float32 through the first `levels` levels of a
// quantizer: centroids [L, bins, D], padded [L, bins, D + 2] = [e, 1, |e|^2] (cdist's table),
// coarse [L, bins, D] float16 (the centroids rounded), norms [L, bins] = |e|.
torch::Tensor rvq_codes(torch::Tensor x, torch::Tensor centroids, torch::Tensor padded, torch::Tensor coarse,
                        torch::Tensor norms, int64_t levels) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "rvq_codes: x must be [rows, dim] float32");
  const int64_t N = x.size(0), D = x.size(1), bins = centroids.size(1);
  TORCH_CHECK(centroids.dim() == 3 && centroids.size(2) == D && levels <= centroids.size(0) &&
                  padded.sizes() == at::IntArrayRef({centroids.size(0), bins, D + 2}) &&
                  coarse.sizes() == centroids.sizes() && norms.sizes() == at::IntArrayRef({centroids.size(0), bins}),
              "rvq_codes: tables of [levels, bins, dim] (padded: dim + 2; norms: [levels, bins])");
  TORCH_CHECK(centroids.is_contiguous() && padded.is_contiguous() && coarse.is_contiguous() && norms.is_contiguous() &&
                  centroids.scalar_type() == torch::kFloat32 && padded.scalar_type() == torch::kFloat32 &&
                  norms.scalar_type() == torch::kFloat32 && coarse.scalar_type() == torch::kFloat16,
              "rvq_codes: contiguous float32 tables, float16 coarse centroids");
  auto residual = x.contiguous().clone();
  auto codes = torch::empty({N, levels}, x.options().dtype(torch::kLong));
  auto ones = torch::ones({N, 1}, x.options());
  std::vector<float> lower;
  std::vector<int64_t> candidates, chosen(N);
  for (int64_t level = 0; level < levels; ++level) {
    // The query as cdist builds it: |r|^2 by PyTorch's own sum, -2r exact in any code.
    const auto twice = residual.mul(-2);
    const auto query = torch::cat({twice, residual.pow(2).sum(-1, true), ones}, -1);
    const auto table = padded[level];
    const auto near = ::skinny_linear(twice, coarse[level], c10::nullopt);  // [N, bins]
    const float* q = query.data_ptr<float>();
    const float* r = residual.data_ptr<float>();
    bool exact = true;
    for (int64_t n = 0; n < N && exact; ++n) {
      float rl1 = 0.f;
      for (int64_t k = 0; k < D; ++k) rl1 += std::fabs(r[n * D + k]);
      chosen[n] = decide(near.data_ptr<float>() + n * bins, q + n * (D + 2), table.data_ptr<float>(),
                         norms[level].data_ptr<float>(), bins, D, rl1 * SLACK, lower, candidates);
      exact = chosen[n] >= 0;
    }
    if (!exact) {
      const auto index = at::matmul(query, table.t()).clamp_min_(0).sqrt_().argmin(-1).contiguous();
      std::copy_n(index.data_ptr<int64_t>(), N, chosen.begin());
    }
    float* rw = residual.data_ptr<float>();
    const float* e = centroids[level].data_ptr<float>();
    for (int64_t n = 0; n < N; ++n) {
      codes.data_ptr<int64_t>()[n * levels + level] = chosen[n];
      for (int64_t k = 0; k < D; ++k) rw[n * D + k] -= e[chosen[n] * D + k];
    }
  }
  return codes;
}

// A streaming step through a whole stack of Mimi's transformer layers in one call.
//
// A Mimi step has two rows and 512 channels: each of its eight layers does ten small
// operations (two LayerNorms, four matrix products, the attention step, the GELU, two
// layer-scaled residuals), and from Python each costs 2-7 µs of dispatch on top of its
// work, about a millisecond per step. Here the same kernels run in the same order from C++:
// the results are the bits of the layer-by-layer path.
//
// The layers are pre-norm with LayerNorm (weight and bias), self-attention with fused
// [q | k | v] projections (RoPE or none), a GELU MLP without biases, and a layer scale on
// both residuals: Mimi's layers. Other kinds go layer by layer in Python.

// Built after the other kernels, as one unit with them (see common.h). Calls name our kernels
// with `::`, as ATen has functions of the same names.

namespace {

// What one layer holds, in the order `layers_step` takes them.
enum LayerWeight { NORM1_W, NORM1_B, IN_PROJ, OUT_PROJ, SCALE1, NORM2_W, NORM2_B, LINEAR1, LINEAR2, SCALE2, PER_LAYER };

// x [A, T, d] @ W^T, the rows flattened as the layer-by-layer path flattens them.
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& weight) {
  const int64_t A = x.size(0), T = x.size(1);
  return ::skinny_linear(x.reshape({A * T, x.size(2)}), weight, c10::nullopt).view({A, T, weight.size(0)});
}

}  // namespace

// x [A, T, d] float32 through the layers whose weights are `weights` (PER_LAYER tensors per
// layer, as listed above), each with its ring cache keys[i] / values[i]; rotation, slots,
// index and allowed as `attention_step` takes them; eps the LayerNorms'.
torch::Tensor layers_step(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> keys,
                          std::vector<torch::Tensor> values, torch::Tensor rotation, torch::Tensor slots,
                          torch::Tensor index, torch::Tensor allowed, double eps) {
  const size_t layers = keys.size();
  TORCH_CHECK(weights.size() == layers * PER_LAYER && values.size() == layers, "layers_step: ", PER_LAYER,
              " weights and one key and value cache per layer");
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32, "layers_step: x must be [rows, steps, d] float32");
  for (size_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = weights.data() + i * PER_LAYER;
    x = ::add_scaled(x, project(::attention_step(project(::layer_norm(x, w[NORM1_W], w[NORM1_B], eps), w[IN_PROJ]),
                                             rotation, keys[i], values[i], slots, index, allowed),
                              w[OUT_PROJ]),
                   w[SCALE1]);
    const torch::Tensor hidden = ::gelu(project(::layer_norm(x, w[NORM2_W], w[NORM2_B], eps), w[LINEAR1]));
    x = ::add_scaled(x, project(hidden, w[LINEAR2]), w[SCALE2]);
  }
  return x;
}

// Operator schemas of fastinpaint: one TORCH_LIBRARY block, one line per op.
// Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta)
// kernels and autograd formulas are registered from Python (fastinpaint/ops/*/op.py).
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <string>

#include "common.h"

namespace fastinpaint {

namespace {
std::atomic<bool> g_debug_poison{false};

void set_debug_poison(bool enabled) { g_debug_poison.store(enabled); }

#ifdef FASTINPAINT_WITH_CUDA
#define FASTINPAINT_CUDA_FLAG "1"
#else
#define FASTINPAINT_CUDA_FLAG "0"
#endif

// The torch version this library was compiled against. The loader reads this marker
// from the file's bytes *before* loading it, to refuse a prebuilt binary built
// against another torch (fastinpaint/_extension.py).
__attribute__((used)) const char kBuildInfo[] =
    "fastinpaint-build-info:torch=" TORCH_VERSION ";cuda=" FASTINPAINT_CUDA_FLAG ";";

std::string build_info() { return kBuildInfo; }

bool has_cuda_kernels() {
#ifdef FASTINPAINT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

bool debug_poison() { return g_debug_poison.load(std::memory_order_relaxed); }

TORCH_LIBRARY(fastinpaint, m) {
  // gated convolution's fused gating: y = act(pre[:, :C]) * sigmoid(pre[:, C:])
  m.def("gated_act_forward(Tensor pre, int activation, float negative_slope) -> Tensor");
  m.def(
      "gated_act_backward(Tensor grad_out, Tensor pre, int activation, float negative_slope) "
      "-> Tensor");

  // self-similarity maps and the spatially-correlative distance (F-LSeSim);
  // g = normalised features (B, H, W, C), index = flat query positions (Q,) int64
  m.def(
      "self_similarity_forward(Tensor g, Tensor index, int patch_size, int window, bool squash) "
      "-> Tensor");
  m.def(
      "self_similarity_backward(Tensor grad, Tensor g, Tensor index, int patch_size, int window) "
      "-> Tensor");
  m.def(
      "spatial_correlative_distance_forward(Tensor g_src, Tensor g_tgt, Tensor index, "
      "int patch_size, int window, bool squash, int mode) -> (Tensor, Tensor)");
  m.def(
      "spatial_correlative_distance_backward(Tensor grad_rows, Tensor g_src, Tensor g_tgt, "
      "Tensor index, Tensor stats, int patch_size, int window, bool squash, int mode) "
      "-> (Tensor, Tensor)");

  // pixel (matmul) attention and the attention-transfer loss (DGII); q, k (B, N, Dqk),
  // v (B, N, Dv), key_mask (B, N) bool with True = key excluded; distance 0 = l2, 1 = l1
  m.def(
      "pixel_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "pixel_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_mask, "
      "Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_transfer_forward(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, float scale, "
      "int distance) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_transfer_backward(Tensor grad_dist, Tensor q_s, Tensor k_s, Tensor q_t, "
      "Tensor k_t, Tensor lse_s, Tensor lse_t, Tensor c, float scale, int distance) "
      "-> (Tensor, Tensor)");

  // channel-wise fully connected layer (Context Encoders): y[b, c] = act(W[c] @ x[b, c] + bias[c]);
  // x (B, C, H, W), weight (C, H*W, H*W), bias (C, H*W); the backward reads act' from out;
  // gradients not asked for come back as empty tensors
  m.def(
      "channel_fc_forward(Tensor x, Tensor weight, Tensor? bias, int activation, "
      "float negative_slope) -> Tensor");
  m.def(
      "channel_fc_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? out, int activation, "
      "float negative_slope, bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");

  // partial convolution's fused renormalisation (Liu et al. 2018): raw = conv2d(x * M, W)
  // without bias (B, C, Ho, Wo), mask_sum = M summed over its channels (B, 1, H, W) in the
  // accumulation dtype -> (out, scale, new_mask), the last two (B, 1, Ho, Wo)
  m.def(
      "partial_conv_renorm(Tensor raw, Tensor mask_sum, Tensor? bias, int[] kernel, int[] stride, "
      "int[] padding, int[] dilation, float window_size) -> (Tensor, Tensor, Tensor)");

  // housekeeping
  m.def("_set_debug_poison(bool enabled) -> ()", &set_debug_poison);
  m.def("_build_info() -> str", &build_info);
  m.def("_has_cuda_kernels() -> bool", &has_cuda_kernels);
}

}  // namespace fastinpaint

// No Python entry point: the library is loaded with torch.ops.load_library
// (fastinpaint/_extension.py), so building it needs no Python headers.

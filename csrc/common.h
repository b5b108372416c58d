// Shared helpers for fastinpaint's C++ and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace fastinpaint {

// Activation codes; must match fastinpaint/ops/gated_conv/reference.py (ACTIVATION_CODES).
enum class Activation : int64_t { kNone = 0, kReLU = 1, kLeakyReLU = 2, kELU = 3 };

inline Activation check_activation(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 3,
              "fastinpaint: activation code must be 0 (none), 1 (relu), 2 (leaky_relu) or 3 (elu), got ",
              code);
  return static_cast<Activation>(code);
}

// When true, every output a kernel allocates is first filled with NaN, so an element
// the kernel forgets to write fails the tests instead of passing by luck. Toggled
// from Python through torch.ops.fastinpaint._set_debug_poison.
bool debug_poison();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                             at::MemoryFormat format) {
  at::Tensor out = at::empty(sizes, options.memory_format(format));
  if (debug_poison()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

// The pre-activation of a gated convolution, (B, 2C, H, W), is read as
// rows x {feature, gate} x inner:
//   NCHW contiguous:         rows = B,         inner = C*H*W
//   channels_last contiguous: rows = B*H*W,     inner = C
// feature element (r, i) is at r*2*inner + i, gate at r*2*inner + inner + i,
// output (r, i) at r*inner + i. Both layouts run the same kernels.
struct GateLayout {
  at::MemoryFormat format;
  int64_t rows;
  int64_t inner;
};

inline bool prefers_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         !t.is_contiguous(at::MemoryFormat::Contiguous);
}

inline GateLayout gate_layout(const at::Tensor& pre) {
  const int64_t B = pre.size(0), C = pre.size(1) / 2, H = pre.size(2), W = pre.size(3);
  if (prefers_channels_last(pre)) {
    return {at::MemoryFormat::ChannelsLast, B * H * W, C};
  }
  return {at::MemoryFormat::Contiguous, B, C * H * W};
}

inline void check_pre(const at::Tensor& pre, const char* name) {
  TORCH_CHECK(pre.dim() == 4, "fastinpaint: ", name, " must be 4-D (B, 2*C, H, W), got ",
              pre.dim(), "-D");
  TORCH_CHECK(pre.size(1) % 2 == 0 && pre.size(1) > 0, "fastinpaint: ", name,
              " must have an even, positive number of channels (features then gates), got ",
              pre.size(1));
  TORCH_CHECK(at::isFloatingType(pre.scalar_type()), "fastinpaint: ", name,
              " must be a floating tensor, got ", pre.scalar_type());
}

}  // namespace fastinpaint

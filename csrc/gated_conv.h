// Host code of the gated convolution's fused gating, shared by its CPU and CUDA kernels
// (csrc/cpu/gated_conv.cpp, csrc/cuda/gated_conv.cu): argument checks, the layout the
// kernels read, and the output allocation.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common.h"

namespace fastinpaint {

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

// Checks every device runs before its gated_conv_act_forward kernel.
inline void check_gate_forward(const at::Tensor& pre, int64_t activation, c10::DeviceType device) {
  check_pre(pre, "pre");
  const auto st = pre.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastinpaint: pre must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(pre.device().type() == device, "fastinpaint: pre must be a ", c10::DeviceTypeName(device),
              " tensor, got ", pre.device());
  check_activation(activation);
}

// ... and before its gated_conv_act_backward kernel.
inline void check_gate_backward(const at::Tensor& grad_out, const at::Tensor& pre, int64_t activation,
                                c10::DeviceType device) {
  check_gate_forward(pre, activation, device);
  TORCH_CHECK(grad_out.dim() == 4, "fastinpaint: grad_out must be 4-D (B, C, H, W), got ",
              grad_out.dim(), "-D");
  TORCH_CHECK(grad_out.device() == pre.device(),
              "fastinpaint: grad_out must be on the same device as pre, got ", grad_out.device(),
              " and ", pre.device());
  TORCH_CHECK(grad_out.scalar_type() == pre.scalar_type(),
              "fastinpaint: grad_out must have the dtype of pre, got ", grad_out.scalar_type(),
              " and ", pre.scalar_type());
  const int64_t B = pre.size(0), C = pre.size(1) / 2, H = pre.size(2), W = pre.size(3);
  TORCH_CHECK(grad_out.size(0) == B && grad_out.size(1) == C && grad_out.size(2) == H &&
                  grad_out.size(3) == W,
              "fastinpaint: grad_out must have shape (B, C, H, W) = (", B, ", ", C, ", ", H, ", ",
              W, ") for pre of shape ", pre.sizes(), ", got ", grad_out.sizes());
}

// pre in the layout the kernels read (channels_last as is, anything else made NCHW-contiguous).
inline at::Tensor gate_input(const at::Tensor& pre, const GateLayout& layout) {
  return layout.format == at::MemoryFormat::ChannelsLast ? pre : pre.contiguous();
}

// The operands of a gating kernel after the checks: pre (and grad_out) in the layout the
// kernels read, and the output allocated in that layout.
struct GateOperands {
  GateLayout layout;
  at::Tensor pre;
  at::Tensor grad_out;  // backward only
  at::Tensor out;       // y (forward) or grad_pre (backward)
};

inline GateOperands gate_forward_operands(const at::Tensor& pre, int64_t activation,
                                          c10::DeviceType device) {
  check_gate_forward(pre, activation, device);
  GateOperands io{gate_layout(pre), {}, {}, {}};
  io.pre = gate_input(pre, io.layout);
  io.out = new_output({pre.size(0), pre.size(1) / 2, pre.size(2), pre.size(3)}, io.pre.options(),
                      io.layout.format);
  return io;
}

inline GateOperands gate_backward_operands(const at::Tensor& grad_out, const at::Tensor& pre,
                                           int64_t activation, c10::DeviceType device) {
  check_gate_backward(grad_out, pre, activation, device);
  GateOperands io{gate_layout(pre), {}, {}, {}};
  io.pre = gate_input(pre, io.layout);
  io.grad_out = grad_out.contiguous(io.layout.format);
  io.out = new_output(pre.sizes(), io.pre.options(), io.layout.format);
  return io;
}

}  // namespace fastinpaint

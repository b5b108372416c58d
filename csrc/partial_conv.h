// Shared checks of the partial convolution's fused renormalisation (csrc/cpu/partial_conv.cpp,
// csrc/cuda/partial_conv.cu); the math is documented there.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common.h"

namespace fastinpaint {
namespace partial_conv {

inline void check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, "fastinpaint: partial_conv_renorm: ", name, " must have 2 elements, got ",
              v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, "fastinpaint: partial_conv_renorm: ", name,
              " must be >= ", minimum, ", got ", v);
}

// The checked operands: raw in the layout the kernels read, mask_sum contiguous, bias
// contiguous or undefined, and the three outputs allocated.
struct Operands {
  at::Tensor raw, mask_sum, bias, out, scale, um;
  bool channels_last;
  int64_t B, C, H, W, Ho, Wo;
};

inline Operands operands(const at::Tensor& raw_in, const at::Tensor& mask_sum_in,
                         const c10::optional<at::Tensor>& bias_in, at::IntArrayRef kernel,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         c10::DeviceType device) {
  TORCH_CHECK(raw_in.dim() == 4, "fastinpaint: partial_conv_renorm: raw must be 4-D (B, C, Ho, Wo), got ",
              raw_in.dim(), "-D");
  const auto st = raw_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastinpaint: partial_conv_renorm: raw must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(raw_in.device().type() == device, "fastinpaint: partial_conv_renorm: raw must be a ",
              c10::DeviceTypeName(device), " tensor, got ", raw_in.device());
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mask_sum_in.dim() == 4 && mask_sum_in.size(1) == 1 && mask_sum_in.size(0) == raw_in.size(0),
              "fastinpaint: partial_conv_renorm: mask_sum must be (B, 1, H, W) with B = ", raw_in.size(0),
              ", got ", mask_sum_in.sizes());
  TORCH_CHECK(mask_sum_in.scalar_type() == acc, "fastinpaint: partial_conv_renorm: mask_sum must be ", acc,
              " for raw of ", st, ", got ", mask_sum_in.scalar_type());
  TORCH_CHECK(mask_sum_in.device() == raw_in.device(),
              "fastinpaint: partial_conv_renorm: mask_sum must be on raw's device, got ", mask_sum_in.device());
  check_pair(kernel, "kernel", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  Operands io;
  io.B = raw_in.size(0);
  io.C = raw_in.size(1);
  io.Ho = raw_in.size(2);
  io.Wo = raw_in.size(3);
  io.H = mask_sum_in.size(2);
  io.W = mask_sum_in.size(3);
  for (int i = 0; i < 2; ++i) {
    const int64_t in = i == 0 ? io.H : io.W, outsz = i == 0 ? io.Ho : io.Wo;
    const int64_t expect = (in + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i] + 1;
    TORCH_CHECK(expect == outsz, "fastinpaint: partial_conv_renorm: raw's ", i == 0 ? "height " : "width ",
                outsz, " is not the convolution output size ", expect, " of the mask's ", in);
  }
  if (bias_in.has_value() && bias_in->defined()) {
    io.bias = bias_in->contiguous();
    TORCH_CHECK(io.bias.dim() == 1 && io.bias.size(0) == io.C,
                "fastinpaint: partial_conv_renorm: bias must be (C,) = (", io.C, ",), got ", io.bias.sizes());
    TORCH_CHECK(io.bias.scalar_type() == st && io.bias.device() == raw_in.device(),
                "fastinpaint: partial_conv_renorm: bias must have raw's dtype and device");
  }
  io.channels_last = prefers_channels_last(raw_in);
  const auto fmt = io.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  io.raw = raw_in.contiguous(fmt);
  io.mask_sum = mask_sum_in.contiguous();
  io.out = new_output(io.raw.sizes(), io.raw.options(), fmt);
  io.scale = new_output({io.B, 1, io.Ho, io.Wo}, io.mask_sum.options(), at::MemoryFormat::Contiguous);
  io.um = new_output({io.B, 1, io.Ho, io.Wo}, io.mask_sum.options(), at::MemoryFormat::Contiguous);
  return io;
}

}  // namespace partial_conv
}  // namespace fastinpaint

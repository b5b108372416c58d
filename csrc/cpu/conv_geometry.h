// The geometry of a 2-D convolution for the CPU gradient kernels of fastinpaint's layers
// (conv_input_grad.cpp, conv_weight_grad.cpp), and the check of their shared arguments.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace fastinpaint {

struct ConvGeometry {  // input (B, C, H, W), O filters of kh x kw, output Ho x Wo; stride, padding, dilation
  int64_t B, C, H, W, O, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// Checks the arguments of op (its name, for the messages) and returns its geometry: grad
// (B, O, Ho, Wo), input (B, C, H, W) and weight (O, C, kh, kw) (the gradient kernels have one
// of the last two as a tensor, other, named other_name, and the other's size); one floating
// dtype (float32 or float64) for grad and other; stride, padding and dilation pairs; Ho x Wo
// the convolution's output of the input.
inline ConvGeometry conv_geometry(const char* op, const at::Tensor& grad, const at::Tensor& other,
                                  const char* other_name,
                                  at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(grad.dim() == 4 && input_size.size() == 4 && weight_size.size() == 4, op,
              ": grad must be (B, O, Ho, Wo), the input (B, C, H, W) and the weight (O, C, kh, kw)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation are (h, w) pairs");
  TORCH_CHECK(grad.scalar_type() == other.scalar_type() &&
                  (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble),
              op, ": grad and ", other_name, " must both be float32 or both float64");
  const ConvGeometry g{input_size[0], input_size[1], input_size[2], input_size[3], weight_size[0], grad.size(2),
                       grad.size(3), weight_size[2], weight_size[3], stride[0], stride[1], padding[0], padding[1],
                       dilation[0], dilation[1]};
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0, op,
              ": stride and dilation must be >= 1, padding >= 0");
  TORCH_CHECK(weight_size[1] == g.C && grad.size(0) == g.B && grad.size(1) == g.O, op, ": grad ", grad.sizes(),
              ", weight ", weight_size, " and input ", input_size, " do not match");
  TORCH_CHECK(g.Ho == (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1 &&
                  g.Wo == (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1,
              op, ": grad's map ", g.Ho, "x", g.Wo, " is not the convolution's output of input ", input_size);
  return g;
}

}  // namespace fastinpaint

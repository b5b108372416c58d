// Channel-wise fully connected layer (Context Encoders, Pathak et al. 2016), host code
// shared by the CPU (csrc/cpu/channel_fc.cpp) and CUDA (csrc/cuda/channel_fc.cu) kernels:
//
//   y[b, c, :] = act(W[c] @ x[b, c, :] + bias[c]),   x[b, c, :] the P = H*W positions.
//
// Per channel c this is a GEMM: with X_c the (B x P) matrix x[:, c, :],
//   forward   Y_c  = X_c @ W_c^T                  (then + bias, act)
//   backward  D_c  = dY_c * act'(pre)             (act' read from the saved output y)
//             dX_c = D_c @ W_c,  dW_c = D_c^T @ X_c,  db_c = sum_b D_c.
// In NCHW memory X_c is a row-major (B x P) matrix with leading dimension C*P, starting at
// c*P: the whole layer is one strided batched GEMM over c that reads x where it lies
// (at::bmm on the (C, B, P) view: MKL on CPU, cuBLAS on CUDA). The GEMM writes a
// (C, B, P) buffer; one fused elementwise pass per device (bias, activation, and the
// (C, B, P) -> (B, C, P) transposition into y's memory format) replaces the eager
// formulation's copy, bias add and activation. The backward computes D in one fused
// pass (or uses dY's (C, B, P) view as is when there is no activation).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>

#include "common.h"

namespace fastinpaint {
namespace channel_fc {

// The memory format of y (and of dx): x's, with the rule of fastinpaint/ops/_layout.py
// (suggest_memory_format): channels_last for channels_last x or a strided view whose
// channel stride is the smallest, else NCHW.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  if (x.is_contiguous()) {
    return at::MemoryFormat::Contiguous;
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (x.size(1) > 1 && x.stride(1) < std::min(x.stride(2), x.stride(3))) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// (B, C, P) view of a (B, C, H, W) tensor when its H and W axes merge (any dense layout
// does), else of a contiguous copy.
inline at::Tensor as_bcp(const at::Tensor& t) {
  const int64_t B = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  int64_t sp;
  if (H == 1) {
    sp = t.stride(3);
  } else if (W == 1) {
    sp = t.stride(2);
  } else if (t.stride(2) == W * t.stride(3)) {
    sp = t.stride(3);
  } else {
    return t.contiguous().view({B, C, H * W});
  }
  return t.as_strided({B, C, H * W}, {t.stride(0), t.stride(1), sp}, t.storage_offset());
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastinpaint: ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fastinpaint: ", name, " must be on the device of x (",
              x.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastinpaint: ", name,
              " must have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
}

inline void check_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, int64_t activation,
                          double negative_slope, c10::DeviceType device) {
  TORCH_CHECK(x.dim() == 4, "fastinpaint: x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  check_float(x, "x");
  TORCH_CHECK(x.device().type() == device, "fastinpaint: x must be a ",
              c10::DeviceTypeName(device), " tensor, got ", x.device());
  const int64_t C = x.size(1), P = x.size(2) * x.size(3);
  TORCH_CHECK(C > 0 && P > 0, "fastinpaint: x must have positive channels, height and width, got ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == C && weight.size(1) == P && weight.size(2) == P,
              "fastinpaint: weight must have shape (C, H*W, H*W) = (", C, ", ", P, ", ", P,
              ") for x of shape ", x.sizes(), ", got ", weight.sizes());
  check_like(weight, x, "weight");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == C && bias->size(1) == P,
                "fastinpaint: bias must have shape (C, H*W) = (", C, ", ", P, "), got ",
                bias->sizes());
    check_like(*bias, x, "bias");
  }
  check_activation(activation);
  TORCH_CHECK(activation != 2 || negative_slope >= 0,
              "fastinpaint: negative_slope must be >= 0 (the backward reads the sign of the "
              "output), got ", negative_slope);
}

// Device-specific fused passes, implemented per device:
//   forward_epilogue(t3, bias, y3, activation, slope):
//       y3[b, c, p] = act(t3[b, c, p] + bias[c, p]);  t3 a (B, C, P) strided view of the
//       GEMM's result, bias (C, P) contiguous or undefined, y3 a (B, C, P) strided view of
//       the output.
//   backward_prologue(dy3, y3, d, activation, slope):
//       d[b, c, p] = dy3[b, c, p] * act'(y3[b, c, p]);  d (B, C, P) contiguous (the GEMMs
//       read it through its (C, B, P) view, leading dimension C*P, without a copy).
//   streaming_grads(d, x, weight, need_x, need_weight, dx, dw) -> bool:
//       where the device computes dx = d W and dW = d^T x itself (d the (C, B, P) view above):
//       sets dx (in x's format; an empty tensor when not needed) and dw (likewise) and returns
//       true; false leaves both to the batched GEMMs.
//   weight_major(B, P, for_dx) -> bool:
//       the batched GEMM's orientation for B images of P positions: true computes
//       W_c @ X_c^T (P x B; for dx, W_c^T @ D_c^T), streaming W_c in its row-major layout,
//       with a (C, P, B) result; false X_c @ W_c^T (B x P; for dx, D_c @ W_c) with a (C, B, P)
//       result. Either result is then read through a (B, C, P) view.
template <typename Kernels>
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, int64_t activation,
                   double negative_slope, c10::DeviceType device) {
  check_forward(x, weight, bias, activation, negative_slope, device);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  at::Tensor y = new_output({B, C, H, W}, x.options(), output_format(x));
  if (y.numel() == 0) {
    return y;
  }
  const at::Tensor xt = as_bcp(x).transpose(0, 1);  // (C, B, P)
  at::Tensor t3;  // a (B, C, P) view of the GEMM's result
  if (Kernels::weight_major(B, P, false)) {
    t3 = at::bmm(weight, xt.transpose(1, 2)).permute({2, 0, 1});  // from (C, P, B)
  } else {
    t3 = at::bmm(xt, weight.transpose(1, 2)).transpose(0, 1);  // from (C, B, P)
  }
  at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  at::Tensor y3 = as_bcp(y);
  Kernels::forward_epilogue(t3, b, y3, activation, negative_slope);
  return y;
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& out, int64_t activation, double negative_slope, bool need_x,
    bool need_weight, bool need_bias, c10::DeviceType device) {
  check_forward(x, weight, c10::nullopt, activation, negative_slope, device);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.sizes() == x.sizes(),
              "fastinpaint: grad_out must have the shape of x, ", x.sizes(), ", got ",
              grad_out.sizes());
  check_like(grad_out, x, "grad_out");
  const bool has_act = activation != 0;
  if (has_act) {
    TORCH_CHECK(out.has_value() && out->defined(),
                "fastinpaint: out (the forward's output) is required for an activation");
    TORCH_CHECK(out->sizes() == x.sizes(), "fastinpaint: out must have the shape of x, ",
                x.sizes(), ", got ", out->sizes());
    check_like(*out, x, "out");
  }
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const at::Tensor dy3 = as_bcp(grad_out);
  at::Tensor d;  // (C, B, P) view
  if (!has_act) {
    d = dy3.transpose(0, 1);
  } else {
    at::Tensor d3 = at::empty({B, C, P}, grad_out.options());
    Kernels::backward_prologue(dy3, as_bcp(*out), d3, activation, negative_slope);
    d = d3.transpose(0, 1);
  }
  at::Tensor dx, dw, db;
  // both gradients in one pass over the weight where the device's kernels take them
  if (!((need_x || need_weight) && Kernels::streaming_grads(d, x, weight, need_x, need_weight, dx, dw))) {
    if (need_x) {
      dx = new_output({B, C, H, W}, x.options(), output_format(x));
      if (dx.numel() > 0) {
        if (Kernels::weight_major(B, P, true)) {  // (C, P, B) result
          as_bcp(dx).copy_(at::bmm(weight.transpose(1, 2), d.transpose(1, 2)).permute({2, 0, 1}));
        } else {
          as_bcp(dx).copy_(at::bmm(d, weight).transpose(0, 1));
        }
      }
    } else {
      dx = at::empty({0}, x.options());
    }
    dw = need_weight ? at::bmm(d.transpose(1, 2), as_bcp(x).transpose(0, 1))  // (C, P, P)
                     : at::empty({0}, x.options());
  }
  if (need_bias) {
    db = d.sum(1);  // (C, P)
  } else {
    db = at::empty({0}, x.options());
  }
  return {dx, dw, db};
}

}  // namespace channel_fc
}  // namespace fastinpaint

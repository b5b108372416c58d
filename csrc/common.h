// Shared helpers for fastinpaint's C++ and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace fastinpaint {

// Activation codes; must match fastinpaint/ops/_activation.py (ACTIVATION_CODES).
enum class Activation : int64_t { kNone = 0, kReLU = 1, kLeakyReLU = 2, kELU = 3 };

inline Activation check_activation(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 3,
              "fastinpaint: activation code must be 0 (none), 1 (relu), 2 (leaky_relu) or 3 (elu), got ",
              code);
  return static_cast<Activation>(code);
}

// Calls fn(std::integral_constant<int, A>{}) for the activation code (0 for anything
// unknown: the code is checked by check_activation before a kernel runs).
template <typename Fn>
void dispatch_act(int64_t activation, Fn&& fn) {
  switch (activation) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

// The type the kernels compute in: float for float and the half types, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

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

inline bool prefers_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         !t.is_contiguous(at::MemoryFormat::Contiguous);
}

}  // namespace fastinpaint

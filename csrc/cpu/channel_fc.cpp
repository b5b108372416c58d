// CPU kernels of the channel-wise fully connected layer (host code in csrc/channel_fc.h):
// the GEMMs run through at::bmm (MKL's batched GEMM on strided views, no copies of x for
// NCHW input); this file holds the two fused elementwise passes, parallelised by
// TensorIterator::for_each (torch's own parallel loop: at::parallel_for instantiated in
// an extension built without -fopenmp would be serial, see gated_conv.cpp).
//   forward_epilogue:  y[b, c, p] = act(t[b, c, p] + bias[c, p])  (t: the GEMM result's view)
//   backward_prologue: d[b, c, p] = dy[b, c, p] * act'(y[b, c, p])
// act' comes from the output: relu / leaky_relu (slope >= 0): y > 0 <=> pre > 0; elu:
// exp(pre) = y + 1 for pre <= 0. Math in float (double for double).
#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "channel_fc.h"
#include "common.h"
#include "cpu/cpu_common.h"

namespace fastinpaint {
namespace {

// Branch-free forms (a data-dependent branch per element mispredicts half the time on
// random signs and blocks vectorisation): relu = max(v, 0), leaky = max(v, 0) +
// slope * min(v, 0), elu = v > 0 ? v : expm1(min(v, 0)) as a select. NaN propagates.
template <int A, typename acc_t>
inline acc_t act_fwd(acc_t v, acc_t slope) {
  const acc_t zero(0);
  if constexpr (A == 1) {
    return std::max(v, zero);
  } else if constexpr (A == 2) {
    return std::max(v, zero) + slope * std::min(v, zero);
  } else if constexpr (A == 3) {
    const acc_t e = std::expm1(std::min(v, zero));
    return v > zero ? v : e;
  } else {
    return v;
  }
}

// c ? a : b on the bits: gcc does not if-convert a float ?: whose arm could trap (it
// sinks the arithmetic into the arm and branches), which mispredicts on random signs and
// blocks vectorisation.
inline float blend(bool c, float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, sizeof(ua));
  std::memcpy(&ub, &b, sizeof(ub));
  const uint32_t m = 0u - uint32_t(c);
  const uint32_t r = (ua & m) | (ub & ~m);
  float out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}
inline double blend(bool c, double a, double b) { return c ? a : b; }

// g * act'(pre) from y = act(pre): relu g * 1[y > 0]; leaky_relu (slope >= 0) y > 0 ? g :
// g * slope; elu g * (1 + min(y, 0)) (= g for y > 0, g * exp(pre) = g * (y + 1) otherwise).
template <int A, typename acc_t>
inline acc_t grad_from_out(acc_t g, acc_t y, acc_t slope) {
  const acc_t zero(0), one(1);
  if constexpr (A == 1) {
    return blend(y > zero, g, zero);
  } else if constexpr (A == 2) {
    return blend(y > zero, g, g * slope);
  } else if constexpr (A == 3) {
    return g * (one + std::min(y, zero));
  } else {
    return g;
  }
}

constexpr int64_t kGrain = 16384;

template <typename T>
inline T& at_byte(char* base, int64_t offset) {
  return *reinterpret_cast<T*>(base + offset);
}

// Operands: y (out), t, [bias]. A contiguous inner dimension (the usual case: p) takes a
// plain pointer loop that the compiler vectorises.
template <typename T, int A, bool kBias>
void forward_loop(at::TensorIterator& iter, double slope_d) {
  using acc_t = typename AccOf<T>::type;
  const acc_t slope = static_cast<acc_t>(slope_d);
  constexpr int nt = kBias ? 3 : 2;
  iter.for_each(
      [slope_m = slope](char** data, const int64_t* strides, int64_t n, int64_t m) {
        const acc_t slope = slope_m;  // a local: the member could alias the output for the compiler
        const int64_t* outer = strides + nt;
        constexpr int64_t es = sizeof(T);
        const bool dense = strides[0] == es && strides[1] == es && (!kBias || strides[2] == es);
        for (int64_t j = 0; j < m; ++j) {
          char* y = data[0] + j * outer[0];
          char* t = data[1] + j * outer[1];
          char* b = kBias ? data[2] + j * outer[2] : nullptr;
          if (dense) {
            T* __restrict__ yp = reinterpret_cast<T*>(y);
            const T* __restrict__ tp = reinterpret_cast<const T*>(t);
            const T* __restrict__ bp = reinterpret_cast<const T*>(b);
            for (int64_t i = 0; i < n; ++i) {
              acc_t v = static_cast<acc_t>(tp[i]);
              if constexpr (kBias) {
                v += static_cast<acc_t>(bp[i]);
              }
              yp[i] = static_cast<T>(act_fwd<A, acc_t>(v, slope));
            }
            continue;
          }
          for (int64_t i = 0; i < n; ++i) {
            acc_t v = static_cast<acc_t>(at_byte<const T>(t, i * strides[1]));
            if constexpr (kBias) {
              v += static_cast<acc_t>(at_byte<const T>(b, i * strides[2]));
            }
            at_byte<T>(y, i * strides[0]) = static_cast<T>(act_fwd<A, acc_t>(v, slope));
          }
        }
      },
      kGrain);
}

// Operands: d (out), dy, y.
template <typename T, int A>
void backward_loop(at::TensorIterator& iter, double slope_d) {
  using acc_t = typename AccOf<T>::type;
  const acc_t slope = static_cast<acc_t>(slope_d);
  iter.for_each(
      [slope_m = slope](char** data, const int64_t* strides, int64_t n, int64_t m) {
        const acc_t slope = slope_m;  // a local: the member could alias the output for the compiler
        const int64_t* outer = strides + 3;
        constexpr int64_t es = sizeof(T);
        const bool dense = strides[0] == es && strides[1] == es && strides[2] == es;
        for (int64_t j = 0; j < m; ++j) {
          char* d = data[0] + j * outer[0];
          char* dy = data[1] + j * outer[1];
          char* y = data[2] + j * outer[2];
          if (dense) {
            T* __restrict__ dp = reinterpret_cast<T*>(d);
            const T* __restrict__ gp = reinterpret_cast<const T*>(dy);
            const T* __restrict__ yp = reinterpret_cast<const T*>(y);
            for (int64_t i = 0; i < n; ++i) {
              dp[i] = static_cast<T>(
                  grad_from_out<A, acc_t>(static_cast<acc_t>(gp[i]), static_cast<acc_t>(yp[i]), slope));
            }
            continue;
          }
          for (int64_t i = 0; i < n; ++i) {
            const acc_t g = static_cast<acc_t>(at_byte<const T>(dy, i * strides[1]));
            const acc_t yv = static_cast<acc_t>(at_byte<const T>(y, i * strides[2]));
            at_byte<T>(d, i * strides[0]) = static_cast<T>(grad_from_out<A, acc_t>(g, yv, slope));
          }
        }
      },
      kGrain);
}

struct CpuKernels {
  static void forward_epilogue(const at::Tensor& t, const at::Tensor& bias, at::Tensor& y3,
                               int64_t activation, double slope) {
    const int64_t B = y3.size(0), C = y3.size(1), P = y3.size(2);
    at::TensorIteratorConfig config;
    config.check_all_same_dtype(true).resize_outputs(false);
    // The config borrows its operands: the views live until the loop is done.
    const at::Tensor& tt = t;
    const bool has_bias = bias.defined();
    const at::Tensor bb = has_bias ? bias.view({1, C, P}).expand({B, C, P}) : at::Tensor();
    config.add_output(y3).add_const_input(tt);
    if (has_bias) {
      config.add_const_input(bb);
    }
    at::TensorIterator iter = config.build();
    dispatch_dtype(t.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      dispatch_act(activation, [&](auto a) {
        constexpr int A = decltype(a)::value;
        if (has_bias) {
          forward_loop<T, A, true>(iter, slope);
        } else {
          forward_loop<T, A, false>(iter, slope);
        }
      });
    });
  }

  static void backward_prologue(const at::Tensor& dy3, const at::Tensor& y3, at::Tensor& d,
                                int64_t activation, double slope) {
    at::TensorIteratorConfig config;
    config.check_all_same_dtype(true).resize_outputs(false);
    config.add_output(d).add_const_input(dy3).add_const_input(y3);
    at::TensorIterator iter = config.build();
    dispatch_dtype(d.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      dispatch_act(activation, [&](auto a) { backward_loop<T, decltype(a)::value>(iter, slope); });
    });
  }
};

at::Tensor channel_fc_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t activation,
                                  double negative_slope) {
  return channel_fc::forward<CpuKernels>(x, weight, bias, activation, negative_slope,
                                         c10::DeviceType::CPU);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_fc_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& out, int64_t activation, double negative_slope, bool need_x,
    bool need_weight, bool need_bias) {
  return channel_fc::backward<CpuKernels>(grad_out, x, weight, out, activation, negative_slope,
                                          need_x, need_weight, need_bias, c10::DeviceType::CPU);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) {
  m.impl("channel_fc_forward", &channel_fc_forward_cpu);
  m.impl("channel_fc_backward", &channel_fc_backward_cpu);
}

}  // namespace fastinpaint

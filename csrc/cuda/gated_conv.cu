// CUDA kernels of the gated convolution's fused gating (DeepFill v2):
//   y = act(f) * sigmoid(g),  f = pre[:, :C], g = pre[:, C:]
// and its backward (act and sigmoid are recomputed from pre).
//
// Both memory layouts are read as rows x {feature, gate} x inner (gated_conv.h, gate_layout).
// One thread handles V consecutive elements of a row: 16-byte vector loads and stores when
// inner * sizeof(T) is a multiple of 16 and the base pointers are 16-byte aligned (then
// every row's feature, gate and output segments are aligned too), one element otherwise.
// Grid-stride loops over (rows x inner / V); 32-bit index arithmetic (with a
// multiply-shift divider) when everything fits, 64-bit otherwise.
//
// Math in float (double for double) with the accurate expf / expm1f (no fast math).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "gated_conv.h"
#include "cuda/cuda_common.cuh"

namespace fastinpaint {
namespace {

// sigmoid(g) = 1 / (1 + exp(-g)): exp overflows to inf for g < -88 and gives exactly 0,
// and underflows for g > 88 and gives exactly 1.
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_(acc_t g) {
  return acc_t(1) / (acc_t(1) + exp_(-g));
}

// act(f); NaN propagates as in torch's relu / leaky_relu / elu.
template <int A, typename acc_t>
__device__ __forceinline__ acc_t act_fwd(acc_t f, acc_t slope) {
  if constexpr (A == 1) {
    return f < acc_t(0) ? acc_t(0) : f;
  } else if constexpr (A == 2) {
    return f < acc_t(0) ? f * slope : f;
  } else if constexpr (A == 3) {
    return f <= acc_t(0) ? expm1_(f) : f;
  } else {
    return f;
  }
}

// act(f) and act'(f); act' follows torch's backward formulas at 0 and for NaN.
template <int A, typename acc_t>
__device__ __forceinline__ void act_fwd_bwd(acc_t f, acc_t slope, acc_t& a, acc_t& da) {
  if constexpr (A == 1) {
    a = f < acc_t(0) ? acc_t(0) : f;
    da = f <= acc_t(0) ? acc_t(0) : acc_t(1);
  } else if constexpr (A == 2) {
    a = f < acc_t(0) ? f * slope : f;
    da = f > acc_t(0) ? acc_t(1) : slope;
  } else if constexpr (A == 3) {
    if (f <= acc_t(0)) {
      a = expm1_(f);
      da = a + acc_t(1);  // exp(f)
    } else {
      a = f;
      da = acc_t(1);
    }
  } else {
    a = f;
    da = acc_t(1);
  }
}

// V elements, loaded and stored as one access of V * sizeof(T) bytes.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Element (r, i*V .. i*V+V-1) of the rows x inner problem, in units of V elements:
// output / grad_out pack k = r*inner_v + i, feature pack r*2*inner_v + i, gate + inner_v.
template <typename index_t>
struct RowMap {
  Divider<index_t> inner_v;
  __device__ __forceinline__ index_t feature(index_t k) const {
    const auto qr = inner_v.divmod(k);
    return qr.div * 2 * inner_v.divisor + qr.mod;
  }
};

template <typename T, int A, int V, typename index_t>
__global__ void gated_conv_act_forward_kernel(const T* __restrict__ pre, T* __restrict__ out,
                                         RowMap<index_t> map, index_t total_v,
                                         typename AccOf<T>::type slope) {
  using acc_t = typename AccOf<T>::type;
  using P = Pack<T, V>;
  const P* pre_p = reinterpret_cast<const P*>(pre);
  P* out_p = reinterpret_cast<P*>(out);
  const index_t inner_v = map.inner_v.divisor;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t k = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total_v;
       k += stride) {
    const index_t fo = map.feature(k);
    const P f = pre_p[fo];
    const P g = pre_p[fo + inner_v];
    P y;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t fv = static_cast<acc_t>(f.v[j]);
      const acc_t gv = static_cast<acc_t>(g.v[j]);
      y.v[j] = static_cast<T>(act_fwd<A, acc_t>(fv, slope) * sigmoid_<acc_t>(gv));
    }
    out_p[k] = y;
  }
}

template <typename T, int A, int V, typename index_t>
__global__ void gated_conv_act_backward_kernel(const T* __restrict__ dy, const T* __restrict__ pre,
                                          T* __restrict__ dpre, RowMap<index_t> map,
                                          index_t total_v, typename AccOf<T>::type slope) {
  using acc_t = typename AccOf<T>::type;
  using P = Pack<T, V>;
  const P* dy_p = reinterpret_cast<const P*>(dy);
  const P* pre_p = reinterpret_cast<const P*>(pre);
  P* dpre_p = reinterpret_cast<P*>(dpre);
  const index_t inner_v = map.inner_v.divisor;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t k = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total_v;
       k += stride) {
    const index_t fo = map.feature(k);
    const P d = dy_p[k];
    const P f = pre_p[fo];
    const P g = pre_p[fo + inner_v];
    P df, dg;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t dv = static_cast<acc_t>(d.v[j]);
      acc_t a, da;
      act_fwd_bwd<A, acc_t>(static_cast<acc_t>(f.v[j]), slope, a, da);
      const acc_t s = sigmoid_<acc_t>(static_cast<acc_t>(g.v[j]));
      const acc_t dys = dv * s;
      df.v[j] = static_cast<T>(dys * da);
      dg.v[j] = static_cast<T>(dys * a * (acc_t(1) - s));
    }
    dpre_p[fo] = df;
    dpre_p[fo + inner_v] = dg;
  }
}

constexpr int kThreads = kElementwiseThreads;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launches kernel<V, index_t> for the problem: V = 16 / sizeof(T) when vec, else 1;
// 32-bit indices when every index the grid-stride loop forms fits.
template <typename T, typename Launch>
void launch_rows(int64_t rows, int64_t inner, bool vec, const Launch& launch) {
  constexpr int kVec = 16 / sizeof(T);
  auto go = [&](auto v_tag) {
    constexpr int V = decltype(v_tag)::value;
    const int64_t inner_v = inner / V;
    const int64_t total_v = rows * inner_v;
    const int64_t grid = grid_for(total_v);
    // Largest index formed: a feature/gate pack index (< 2 * total_v) or k + stride. The
    // 32-bit fast divider also needs its dividend k <= INT32_MAX.
    with_index_type(2 * total_v + grid * kThreads, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      launch(v_tag, RowMap<index_t>{Divider<index_t>(static_cast<index_t>(inner_v))},
             static_cast<index_t>(total_v), grid);
    });
  };
  if (vec) {
    go(std::integral_constant<int, kVec>{});
  } else {
    go(std::integral_constant<int, 1>{});
  }
}

at::Tensor gated_conv_act_forward_cuda(const at::Tensor& pre, int64_t activation,
                                  double negative_slope) {
  GateOperands io = gate_forward_operands(pre, activation, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(pre.device());
  if (io.out.numel() == 0) {
    return io.out;
  }
  const GateLayout& layout = io.layout;
  const at::Tensor& p = io.pre;
  at::Tensor& out = io.out;

  const int64_t rows = layout.rows, inner = layout.inner;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.scalar_type(), "fastinpaint_gated_conv_act_forward", [&] {
        using acc_t = typename AccOf<scalar_t>::type;
        const scalar_t* pp = p.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        const bool vec = (inner * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
                         aligned16(pp) && aligned16(op);
        const acc_t slope = static_cast<acc_t>(negative_slope);
        dispatch_act(activation, [&](auto a_tag) {
          constexpr int A = decltype(a_tag)::value;
          launch_rows<scalar_t>(rows, inner, vec, [&](auto v_tag, auto map, auto total_v,
                                                      int64_t grid) {
            constexpr int V = decltype(v_tag)::value;
            using index_t = decltype(total_v);
            gated_conv_act_forward_kernel<scalar_t, A, V, index_t>
                <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(pp, op, map, total_v,
                                                                       slope);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
  return out;
}

at::Tensor gated_conv_act_backward_cuda(const at::Tensor& grad_out, const at::Tensor& pre,
                                   int64_t activation, double negative_slope) {
  GateOperands io = gate_backward_operands(grad_out, pre, activation, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(pre.device());
  if (io.out.numel() == 0) {
    return io.out;
  }
  const GateLayout& layout = io.layout;
  const at::Tensor& p = io.pre;
  const at::Tensor& dy = io.grad_out;
  at::Tensor& dpre = io.out;

  const int64_t rows = layout.rows, inner = layout.inner;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.scalar_type(), "fastinpaint_gated_conv_act_backward", [&] {
        using acc_t = typename AccOf<scalar_t>::type;
        const scalar_t* dp = dy.const_data_ptr<scalar_t>();
        const scalar_t* pp = p.const_data_ptr<scalar_t>();
        scalar_t* op = dpre.mutable_data_ptr<scalar_t>();
        const bool vec = (inner * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
                         aligned16(dp) && aligned16(pp) && aligned16(op);
        const acc_t slope = static_cast<acc_t>(negative_slope);
        dispatch_act(activation, [&](auto a_tag) {
          constexpr int A = decltype(a_tag)::value;
          launch_rows<scalar_t>(rows, inner, vec, [&](auto v_tag, auto map, auto total_v,
                                                      int64_t grid) {
            constexpr int V = decltype(v_tag)::value;
            using index_t = decltype(total_v);
            gated_conv_act_backward_kernel<scalar_t, A, V, index_t>
                <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(dp, pp, op, map,
                                                                       total_v, slope);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
  return dpre;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CUDA, m) {
  m.impl("gated_conv_act_forward", &gated_conv_act_forward_cuda);
  m.impl("gated_conv_act_backward", &gated_conv_act_backward_cuda);
}

}  // namespace fastinpaint

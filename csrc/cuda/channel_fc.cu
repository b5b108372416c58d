// CUDA kernels of the channel-wise fully connected layer (host code in csrc/channel_fc.h):
// the GEMMs run through at::bmm (cuBLAS strided batched GEMM on the (C, B, P) views, no
// copies of x for NCHW input); this file holds the two fused elementwise passes:
//   forward_epilogue:  y[b, c, p] = act(t[b, c, p] + bias[c, p])  (t: the GEMM result's view)
//   backward_prologue: d[b, c, p] = dy[b, c, p] * act'(y[b, c, p])
// One thread per element of the (B, C, P) problem (grid-stride; 32-bit indices and fast
// dividers when they fit, else 64-bit: cuda_common.cuh); strided
// operands are addressed through their strides, so NCHW and channels_last outputs are
// written in place. act' comes from the output: relu /
// leaky_relu (slope >= 0): y > 0 <=> pre > 0; elu: exp(pre) = y + 1 for pre <= 0.
// Math in float (double for double), accurate expm1 (no fast math).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "channel_fc.h"
#include "common.h"
#include "cuda/cuda_common.cuh"

namespace fastinpaint {
namespace {

template <int A, typename acc_t>
__device__ __forceinline__ acc_t act_fwd(acc_t v, acc_t slope) {
  if constexpr (A == 1) {
    return v > acc_t(0) ? v : acc_t(0);
  } else if constexpr (A == 2) {
    return v > acc_t(0) ? v : v * slope;
  } else if constexpr (A == 3) {
    return v > acc_t(0) ? v : expm1_(v);
  } else {
    return v;
  }
}

// act'(pre) from y = act(pre); elu: 1 + min(y, 0) (= 1 for y > 0, exp(pre) = y + 1 otherwise).
template <int A, typename acc_t>
__device__ __forceinline__ acc_t act_grad_from_out(acc_t y, acc_t slope) {
  if constexpr (A == 1) {
    return y > acc_t(0) ? acc_t(1) : acc_t(0);
  } else if constexpr (A == 2) {
    return y > acc_t(0) ? acc_t(1) : slope;
  } else if constexpr (A == 3) {
    return acc_t(1) + (y < acc_t(0) ? y : acc_t(0));
  } else {
    return acc_t(1);
  }
}

// Strides (in elements) of a (B, C, P) operand.
struct Bcp {
  int64_t sb, sc, sp;
  __device__ __forceinline__ int64_t at(int64_t b, int64_t c, int64_t p) const {
    return b * sb + c * sc + p * sp;
  }
};

// Element i = (b * C + c) * P + p of the (B, C, P) problem split into (b, c, p) by the fast
// dividers of P and C (32-bit when the launch allows: cuda_common.cuh).
template <typename index_t>
struct BcpIndex {
  Divider<index_t> P, C;
  __device__ __forceinline__ void split(index_t i, index_t& b, index_t& c, index_t& p) const {
    const auto bc_p = P.divmod(i);
    const auto b_c = C.divmod(bc_p.div);
    b = b_c.div;
    c = b_c.mod;
    p = bc_p.mod;
  }
};

template <typename T, int A, bool kBias, typename index_t>
__global__ void forward_epilogue_kernel(const T* __restrict__ t, Bcp ts, const T* __restrict__ bias,
                                        T* __restrict__ y, Bcp ys, index_t n, BcpIndex<index_t> idx,
                                        typename AccOf<T>::type slope) {
  using acc_t = typename AccOf<T>::type;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    index_t b, c, p;
    idx.split(i, b, c, p);
    acc_t v = static_cast<acc_t>(t[ts.at(b, c, p)]);
    if constexpr (kBias) {
      v += static_cast<acc_t>(bias[static_cast<int64_t>(c) * idx.P.divisor + p]);
    }
    y[ys.at(b, c, p)] = static_cast<T>(act_fwd<A, acc_t>(v, slope));
  }
}

template <typename T, int A, typename index_t>
__global__ void backward_prologue_kernel(const T* __restrict__ dy, Bcp ds, const T* __restrict__ y,
                                         Bcp ys, T* __restrict__ d, index_t n, BcpIndex<index_t> idx,
                                         typename AccOf<T>::type slope) {
  using acc_t = typename AccOf<T>::type;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    index_t b, c, p;
    idx.split(i, b, c, p);
    const acc_t g = static_cast<acc_t>(dy[ds.at(b, c, p)]);
    const acc_t yv = static_cast<acc_t>(y[ys.at(b, c, p)]);
    d[i] = static_cast<T>(g * act_grad_from_out<A, acc_t>(yv, slope));
  }
}

constexpr int kThreads = kElementwiseThreads;

Bcp strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Calls launch(n, idx, grid) with the (B, C, P) problem's element count and divider in the
// narrowest index type that holds every index the grid-stride loop forms.
template <typename Launch>
void launch_bcp(int64_t n, int64_t C, int64_t P, const Launch& launch) {
  const int64_t grid = grid_for(n, kThreads);
  with_index_type(n + grid * kThreads, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    launch(static_cast<index_t>(n),
           BcpIndex<index_t>{Divider<index_t>(static_cast<index_t>(P)), Divider<index_t>(static_cast<index_t>(C))},
           grid);
  });
}

struct CudaKernels {
  // maps larger than the batch stream the large weight in its row-major layout
  static bool weight_major(int64_t B, int64_t P, bool /*for_dx*/) { return P > B; }

  // the batched GEMMs (cuBLAS) for both gradients
  static bool streaming_grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool, at::Tensor&,
                              at::Tensor&) {
    return false;
  }

  static void forward_epilogue(const at::Tensor& t, const at::Tensor& bias, at::Tensor& y3,
                               int64_t activation, double slope) {
    TORCH_CHECK(!bias.defined() || bias.is_contiguous(),
                "fastinpaint: channel_fc epilogue expects a contiguous bias");
    const int64_t C = y3.size(1), P = y3.size(2), n = y3.numel();
    if (n == 0) {
      return;
    }
    const c10::cuda::CUDAGuard guard(t.device());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const Bcp ys = strides_of(y3), ts = strides_of(t);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "channel_fc_fwd", [&] {
      using acc_t = typename AccOf<scalar_t>::type;
      dispatch_act(activation, [&](auto a) {
        constexpr int A = decltype(a)::value;
        launch_bcp(n, C, P, [&](auto n_i, auto idx, int64_t grid) {
          using index_t = decltype(n_i);
          if (bias.defined()) {
            forward_epilogue_kernel<scalar_t, A, true, index_t>
                <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
                    t.const_data_ptr<scalar_t>(), ts, bias.const_data_ptr<scalar_t>(),
                    y3.mutable_data_ptr<scalar_t>(), ys, n_i, idx, static_cast<acc_t>(slope));
          } else {
            forward_epilogue_kernel<scalar_t, A, false, index_t>
                <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
                    t.const_data_ptr<scalar_t>(), ts, nullptr, y3.mutable_data_ptr<scalar_t>(), ys,
                    n_i, idx, static_cast<acc_t>(slope));
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }

  static void backward_prologue(const at::Tensor& dy3, const at::Tensor& y3, at::Tensor& d,
                                int64_t activation, double slope) {
    TORCH_CHECK(d.is_contiguous(), "fastinpaint: channel_fc prologue expects a contiguous output");
    const int64_t C = dy3.size(1), P = dy3.size(2), n = d.numel();
    if (n == 0) {
      return;
    }
    const c10::cuda::CUDAGuard guard(d.device());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const Bcp ds = strides_of(dy3), ys = strides_of(y3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "channel_fc_bwd", [&] {
      using acc_t = typename AccOf<scalar_t>::type;
      dispatch_act(activation, [&](auto a) {
        constexpr int A = decltype(a)::value;
        launch_bcp(n, C, P, [&](auto n_i, auto idx, int64_t grid) {
          using index_t = decltype(n_i);
          backward_prologue_kernel<scalar_t, A, index_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
              dy3.const_data_ptr<scalar_t>(), ds, y3.const_data_ptr<scalar_t>(), ys,
              d.mutable_data_ptr<scalar_t>(), n_i, idx, static_cast<acc_t>(slope));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
};

at::Tensor channel_fc_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, int64_t activation,
                                   double negative_slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  return channel_fc::forward<CudaKernels>(x, weight, bias, activation, negative_slope,
                                          c10::DeviceType::CUDA);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_fc_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& out, int64_t activation, double negative_slope, bool need_x,
    bool need_weight, bool need_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  return channel_fc::backward<CudaKernels>(grad_out, x, weight, out, activation, negative_slope,
                                           need_x, need_weight, need_bias, c10::DeviceType::CUDA);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CUDA, m) {
  m.impl("channel_fc_forward", &channel_fc_forward_cuda);
  m.impl("channel_fc_backward", &channel_fc_backward_cuda);
}

}  // namespace fastinpaint

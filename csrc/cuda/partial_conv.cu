// CUDA kernels of the partial convolution's fused renormalisation (the math is documented
// in csrc/cpu/partial_conv.cpp): one kernel for the per-pixel window sum of the channel-summed
// mask (scale and updated mask), one for out = raw * scale + bias * um over every element
// (NCHW or channels_last). Grid-stride loops (32-bit indices and fast dividers when they fit,
// else 64-bit: cuda_common.cuh); math in float (double for double).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "partial_conv.h"
#include "cuda/cuda_common.cuh"

namespace fastinpaint {
namespace {

struct Geometry {
  int64_t H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// Output pixel p = (b * Ho + oy) * Wo + ox split by the fast dividers of Wo and Ho.
template <typename index_t>
struct PixelIndex {
  Divider<index_t> Wo, Ho;
};

template <typename acc_t, typename index_t>
__global__ void window_sum_kernel(const acc_t* __restrict__ ms, acc_t* __restrict__ scale, acc_t* __restrict__ um,
                                  index_t n_pix, PixelIndex<index_t> pix, Geometry g, acc_t window_size,
                                  bool has_bias) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n_pix; p += step) {
    const auto row_x = pix.Wo.divmod(p);
    const auto b_y = pix.Ho.divmod(row_x.div);
    const int64_t b = b_y.div, oy = b_y.mod, ox = row_x.mod;
    const acc_t* plane = ms + b * g.H * g.W;
    acc_t sum = 0;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
      if (iy < 0 || iy >= g.H) continue;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
        if (ix >= 0 && ix < g.W) sum += plane[iy * g.W + ix];
      }
    }
    const acc_t u = sum < acc_t(0) ? acc_t(0) : (sum > acc_t(1) ? acc_t(1) : sum);
    acc_t sc = window_size / (sum + acc_t(1e-8)) * u;
    if (has_bias) sc *= u;
    scale[p] = sc;
    um[p] = u;
  }
}

// Element e of the output split into (channel, pixel): e = (b * P + p) * C + c for
// channels_last, e = (b * C + c) * P + p otherwise; fast dividers of C and P.
template <typename index_t>
struct ElementIndex {
  Divider<index_t> C, P;
  bool channels_last;
  __device__ __forceinline__ void split(index_t e, index_t& c, index_t& pix) const {
    if (channels_last) {
      const auto q = C.divmod(e);
      c = q.mod;
      pix = q.div;
    } else {
      const auto bc_p = P.divmod(e);
      const auto b_c = C.divmod(bc_p.div);
      c = b_c.mod;
      pix = b_c.div * P.divisor + bc_p.mod;
    }
  }
};

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void apply_kernel(const scalar_t* __restrict__ raw, const scalar_t* __restrict__ bias,
                             const acc_t* __restrict__ scale, const acc_t* __restrict__ um,
                             scalar_t* __restrict__ out, index_t n, ElementIndex<index_t> idx) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    index_t c, pix;
    idx.split(e, c, pix);
    acc_t y = static_cast<acc_t>(raw[e]) * scale[pix];
    if (bias != nullptr) y += static_cast<acc_t>(bias[c]) * um[pix];
    out[e] = static_cast<scalar_t>(y);
  }
}

constexpr int kThreads = kElementwiseThreads;

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_renorm_cuda(
    const at::Tensor& raw_in, const at::Tensor& mask_sum_in, const c10::optional<at::Tensor>& bias_in,
    at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    double window_size) {
  const c10::cuda::CUDAGuard device_guard(raw_in.device());
  auto io = partial_conv::operands(raw_in, mask_sum_in, bias_in, kernel, stride, padding, dilation,
                                   c10::DeviceType::CUDA);
  const int64_t n_pix = io.B * io.Ho * io.Wo;
  if (n_pix == 0) return {io.out, io.scale, io.um};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Geometry g{io.H, io.W, io.Ho, io.Wo, kernel[0], kernel[1], stride[0], stride[1],
                   padding[0], padding[1], dilation[0], dilation[1]};
  const bool has_bias = io.bias.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.raw.scalar_type(), "partial_conv_renorm_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t pix_grid = grid_for(n_pix, kThreads);
    with_index_type(n_pix + pix_grid * kThreads, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const PixelIndex<index_t> pix{Divider<index_t>(static_cast<index_t>(io.Wo)),
                                    Divider<index_t>(static_cast<index_t>(io.Ho))};
      window_sum_kernel<acc_t, index_t><<<static_cast<unsigned>(pix_grid), kThreads, 0, stream>>>(
          io.mask_sum.data_ptr<acc_t>(), io.scale.data_ptr<acc_t>(), io.um.data_ptr<acc_t>(),
          static_cast<index_t>(n_pix), pix, g, static_cast<acc_t>(window_size), has_bias);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t n = io.raw.numel();
    if (n > 0) {
      const int64_t grid = grid_for(n, kThreads);
      with_index_type(n + grid * kThreads, [&](auto index_tag) {
        using index_t = decltype(index_tag);
        const ElementIndex<index_t> idx{Divider<index_t>(static_cast<index_t>(io.C)),
                                        Divider<index_t>(static_cast<index_t>(io.Ho * io.Wo)), io.channels_last};
        apply_kernel<scalar_t, acc_t, index_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
            io.raw.data_ptr<scalar_t>(), has_bias ? io.bias.data_ptr<scalar_t>() : nullptr,
            io.scale.data_ptr<acc_t>(), io.um.data_ptr<acc_t>(), io.out.data_ptr<scalar_t>(),
            static_cast<index_t>(n), idx);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return {io.out, io.scale, io.um};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CUDA, m) { m.impl("partial_conv_renorm", &partial_conv_renorm_cuda); }

}  // namespace fastinpaint

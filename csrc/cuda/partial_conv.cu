// CUDA kernels of the partial convolution's fused renormalisation (the math is documented
// in csrc/cpu/partial_conv.cpp): one kernel for the per-pixel window sum of the channel-summed
// mask (scale and updated mask), one for out = raw * scale + bias * um over every element
// (NCHW or channels_last). Grid-stride loops, 64-bit indices; math in float (double for double).
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

namespace fastinpaint {
namespace {

struct Geometry {
  int64_t H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

template <typename acc_t>
__global__ void window_sum_kernel(const acc_t* __restrict__ ms, acc_t* __restrict__ scale, acc_t* __restrict__ um,
                                  int64_t n_pix, Geometry g, acc_t window_size, bool has_bias) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n_pix;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = g.Ho * g.Wo;
    const int64_t b = p / hw, r = p - b * hw, oy = r / g.Wo, ox = r - oy * g.Wo;
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

template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ raw, const scalar_t* __restrict__ bias,
                             const acc_t* __restrict__ scale, const acc_t* __restrict__ um,
                             scalar_t* __restrict__ out, int64_t n, int64_t C, int64_t P, bool channels_last) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t c, pix;
    if (channels_last) {  // e = (b * P + p) * C + c
      c = e % C;
      pix = e / C;
    } else {  // e = (b * C + c) * P + p
      const int64_t bc = e / P;
      c = bc % C;
      pix = (bc / C) * P + (e - bc * P);
    }
    acc_t y = static_cast<acc_t>(raw[e]) * scale[pix];
    if (bias != nullptr) y += static_cast<acc_t>(bias[c]) * um[pix];
    out[e] = static_cast<scalar_t>(y);
  }
}

int64_t blocks_for(int64_t n, int threads) {
  constexpr int64_t max_blocks = int64_t(1) << 20;  // grid-stride loops cover the rest
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, max_blocks));
}

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
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.raw.scalar_type(), "partial_conv_renorm_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    window_sum_kernel<acc_t><<<blocks_for(n_pix, kThreads), kThreads, 0, stream>>>(
        io.mask_sum.data_ptr<acc_t>(), io.scale.data_ptr<acc_t>(), io.um.data_ptr<acc_t>(), n_pix, g,
        static_cast<acc_t>(window_size), has_bias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = io.raw.numel();
    if (n > 0) {
      apply_kernel<scalar_t, acc_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          io.raw.data_ptr<scalar_t>(), has_bias ? io.bias.data_ptr<scalar_t>() : nullptr,
          io.scale.data_ptr<acc_t>(), io.um.data_ptr<acc_t>(), io.out.data_ptr<scalar_t>(), n, io.C,
          io.Ho * io.Wo, io.channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {io.out, io.scale, io.um};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CUDA, m) { m.impl("partial_conv_renorm", &partial_conv_renorm_cuda); }

}  // namespace fastinpaint

// CPU kernel of the partial convolution's fused renormalisation (Liu et al., ECCV 2018).
//
// Inputs: raw = conv2d(x * M, W) without bias (B, C, Ho, Wo), any float dtype, NCHW or
// channels_last; mask_sum = the mask summed over its channels (B, 1, H, W) in the
// accumulation dtype (float32, or float64 for float64 raw); the convolution's geometry.
// Per output pixel p (window sum = box filter of mask_sum over the kernel's footprint):
//   msum  = sum_{window(p)} mask_sum          (zero padding)
//   um    = clamp(msum, 0, 1)                 (the updated mask)
//   scale = window_size / (msum + 1e-8) * um  (* um again when there is a bias)
//   out[c] = raw[c] * scale + bias[c] * um
// which is the public formulation ((raw + b - b) * ratio + b) * um with ratio = ws/(msum+eps)*um.
// Returns (out in raw's dtype and layout, scale, um), the last two (B, 1, Ho, Wo) in the
// accumulation dtype; autograd (registered from Python) uses scale and um only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "cpu/cpu_common.h"
#include "partial_conv.h"

namespace fastinpaint {
namespace {

// Elements of work below which a loop stays on the calling thread.
constexpr int64_t kParallelWork = 32768;

template <typename acc_t>
void window_sums(const acc_t* ms, acc_t* scale, acc_t* um, int64_t B, int64_t H, int64_t W, int64_t Ho,
                 int64_t Wo, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                 acc_t window_size, bool has_bias) {
  // a task is worth a thread from ~32K window reads on
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, Wo * k[0] * k[1]));
  parallel_for(0, B * Ho, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Ho, oy = row % Ho;
      const acc_t* plane = ms + b * H * W;
      for (int64_t ox = 0; ox < Wo; ++ox) {
        acc_t sum = 0;
        for (int64_t ky = 0; ky < k[0]; ++ky) {
          const int64_t iy = oy * s[0] - p[0] + ky * d[0];
          if (iy < 0 || iy >= H) continue;
          const acc_t* line = plane + iy * W;
          for (int64_t kx = 0; kx < k[1]; ++kx) {
            const int64_t ix = ox * s[1] - p[1] + kx * d[1];
            if (ix >= 0 && ix < W) sum += line[ix];
          }
        }
        const acc_t u = std::min(std::max(sum, acc_t(0)), acc_t(1));
        acc_t sc = window_size / (sum + acc_t(1e-8)) * u;
        if (has_bias) sc *= u;
        scale[row * Wo + ox] = sc;
        um[row * Wo + ox] = u;
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void apply(const scalar_t* raw, const scalar_t* bias, const acc_t* scale, const acc_t* um, scalar_t* out,
           int64_t B, int64_t C, int64_t P, bool channels_last) {
  if (!channels_last) {  // planes of P pixels
    parallel_for(0, B * C, std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, P)),
                 [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        const acc_t bv = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
        const scalar_t* r = raw + bc * P;
        scalar_t* o = out + bc * P;
        const acc_t* sc = scale + b * P;
        const acc_t* u = um + b * P;
        for (int64_t i = 0; i < P; ++i) {
          o[i] = static_cast<scalar_t>(static_cast<acc_t>(r[i]) * sc[i] + bv * u[i]);
        }
      }
    });
  } else {  // rows of C channels
    parallel_for(0, B * P, std::max<int64_t>(16, kParallelWork / std::max<int64_t>(1, C)),
                 [&](int64_t begin, int64_t end) {
      for (int64_t bp = begin; bp < end; ++bp) {
        const scalar_t* r = raw + bp * C;
        scalar_t* o = out + bp * C;
        const acc_t sc = scale[bp], u = um[bp];
        for (int64_t c = 0; c < C; ++c) {
          const acc_t bv = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
          o[c] = static_cast<scalar_t>(static_cast<acc_t>(r[c]) * sc + bv * u);
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_renorm_cpu(
    const at::Tensor& raw_in, const at::Tensor& mask_sum_in, const c10::optional<at::Tensor>& bias_in,
    at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    double window_size) {
  auto io = partial_conv::operands(raw_in, mask_sum_in, bias_in, kernel, stride, padding, dilation,
                                   c10::DeviceType::CPU);
  if (io.B * io.Ho * io.Wo == 0) return {io.out, io.scale, io.um};
  const bool has_bias = io.bias.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.raw.scalar_type(), "partial_conv_renorm_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    window_sums<acc_t>(io.mask_sum.data_ptr<acc_t>(), io.scale.data_ptr<acc_t>(), io.um.data_ptr<acc_t>(), io.B,
                       io.H, io.W, io.Ho, io.Wo, kernel, stride, padding, dilation, static_cast<acc_t>(window_size),
                       has_bias);
    apply<scalar_t, acc_t>(io.raw.data_ptr<scalar_t>(), has_bias ? io.bias.data_ptr<scalar_t>() : nullptr,
                           io.scale.data_ptr<acc_t>(), io.um.data_ptr<acc_t>(), io.out.data_ptr<scalar_t>(), io.B,
                           io.C, io.Ho * io.Wo, io.channels_last);
  });
  return {io.out, io.scale, io.um};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) { m.impl("partial_conv_renorm", &partial_conv_renorm_cpu); }

}  // namespace fastinpaint

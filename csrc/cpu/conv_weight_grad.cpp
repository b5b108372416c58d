// The gradient of a strided convolution's weight on the CPU. A helper kernel of the
// convolutions of fastinpaint's layers (fastinpaint/ops/_cpu_conv.py), not a public op.
//
// Why: at the downsampling layers of DeepFill v2 and SN-PatchGAN (stride 2, 24 to 128 input
// channels) oneDNN's weight gradient took about twice the time of the same matrix product done
// by torch's GEMM. Here the input's patches of a band of output rows are gathered into a
// buffer that stays in cache (im2col; channels-last input, so each tap is C contiguous values,
// kw * C where the taps of a row are adjacent), and the band's product is accumulated,
//
//     gw (O, kh*kw*C) += grad (P, O)^T @ cols (P, kh*kw*C)       P: the band's output positions
//
// Threads: the bands of every image are split into a fixed number of groups of consecutive
// bands (kGroups, or fewer where there are fewer bands), each with its own accumulator; the
// groups run in parallel, then their accumulators are added in order. Neither the bands nor the
// groups depend on the thread count, but torch's GEMM may split a product's inner dimension
// differently with another thread count, so the last bits may differ between thread counts (as
// oneDNN's own gradient's do). A problem of one band is one product on the calling thread.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common.h"
#include "conv_geometry.h"
#include "cpu_common.h"

namespace fastinpaint {
namespace {

using Geometry = ConvGeometry;

// Accumulators, at most: enough for the threads of the machines this runs on to share the
// bands, few enough that adding them up costs nothing next to the products.
constexpr int64_t kGroups = 8;

// Writes the patches of output rows [i0, i1) of image b into cols (((i - i0) * Wo + j), ky, kx, c),
// zeros where a tap falls in the padding. x: (B, H, W, C) contiguous.
template <typename T>
void gather_rows(const Geometry& g, const T* FI_RESTRICT x, int64_t b, int64_t i0, int64_t i1, T* FI_RESTRICT cols) {
  const int64_t C = g.C, K = g.kh * g.kw * C, span = (g.kw - 1) * g.dw;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = 0; j < g.Wo; ++j) {
      T* dst = cols + ((i - i0) * g.Wo + j) * K;
      const int64_t w0 = j * g.sw - g.pw;
      const bool inside_w = w0 >= 0 && w0 + span < g.W;
      for (int64_t ky = 0; ky < g.kh; ++ky, dst += g.kw * C) {
        const int64_t h = i * g.sh - g.ph + ky * g.dh;
        if (h < 0 || h >= g.H) {
          std::memset(dst, 0, sizeof(T) * g.kw * C);
          continue;
        }
        const T* row = x + ((b * g.H + h) * g.W) * C;
        if (inside_w && g.dw == 1) {  // the row's taps are adjacent: one copy
          std::memcpy(dst, row + w0 * C, sizeof(T) * g.kw * C);
          continue;
        }
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t w = w0 + kx * g.dw;
          if (w < 0 || w >= g.W) {
            std::memset(dst + kx * C, 0, sizeof(T) * C);
          } else {
            std::memcpy(dst + kx * C, row + w * C, sizeof(T) * C);
          }
        }
      }
    }
  }
}

// Output rows per band: their patches within about 1 MB (gathered, then read by the product
// while in cache), but at least kMinPositions output positions (fewer, and the product's
// accumulator, O x kh*kw*C, is read and written for too little work) and one row.
constexpr int64_t kMinPositions = 256;
int64_t band_rows(const Geometry& g, int64_t esize) {
  const int64_t row_bytes = g.Wo * g.kh * g.kw * g.C * esize;
  const int64_t in_cache = (int64_t{1024} << 10) / std::max<int64_t>(row_bytes, 1);
  return std::max<int64_t>({1, in_cache, (kMinPositions + g.Wo - 1) / g.Wo});
}

// gw (O, K) = the sum over every band; gin (B, Ho, Wo, O), x (B, H, W, C) contiguous.
template <typename T>
void weight_grad(const Geometry& g, const at::Tensor& gin, const at::Tensor& x, at::Tensor& gw) {
  const int64_t R = std::min(band_rows(g, sizeof(T)), g.Ho), per_image = (g.Ho + R - 1) / R;
  const int64_t bands = g.B * per_image, groups = std::min(kGroups, bands), K = g.kh * g.kw * g.C;
  const T* xp = x.data_ptr<T>();
  std::vector<at::Tensor> acc(groups);
  parallel_for(0, groups, 1, [&](int64_t q0, int64_t q1) {
    at::Tensor buf = at::empty({R * g.Wo, K}, gin.options());
    for (int64_t q = q0; q < q1; ++q) {
      // bands [q * bands / groups, (q + 1) * bands / groups): consecutive, every group non-empty;
      // the group's first product is written (no zeroed accumulator), the others added
      at::Tensor a = q == 0 ? gw : at::empty_like(gw);
      const int64_t first = q * bands / groups;
      for (int64_t t = first; t < (q + 1) * bands / groups; ++t) {
        const int64_t b = t / per_image, i0 = (t % per_image) * R, i1 = std::min(g.Ho, i0 + R);
        at::Tensor cols = buf.narrow(0, 0, (i1 - i0) * g.Wo);
        gather_rows(g, xp, b, i0, i1, cols.data_ptr<T>());
        // rows [i0, i1) of image b, channels-last: a (positions, O) matrix
        const at::Tensor grad_rows = gin[b].narrow(0, i0, i1 - i0).reshape({(i1 - i0) * g.Wo, g.O});
        if (t == first) {
          at::mm_out(a, grad_rows.t(), cols);
        } else {
          a.addmm_(grad_rows.t(), cols);
        }
      }
      acc[q] = a;
    }
  });
  for (int64_t q = 1; q < groups; ++q) {
    gw.add_(acc[q]);
  }
}

at::Tensor conv2d_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& input, at::IntArrayRef weight_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  bool channels_last) {
  TORCH_CHECK(input.dim() == 4, "conv2d_weight_grad: input must be (B, C, H, W)");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g = conv_geometry("conv2d_weight_grad", grad, input, "input", input.sizes(), weight_size, stride,
                                   padding, dilation);
  TORCH_CHECK(g.O >= 0 && g.kh >= 1 && g.kw >= 1, "conv2d_weight_grad: weight_size must be (O, C, kh, kw) with "
              "O >= 0 and a kernel of at least 1x1, got ", weight_size);
  // (O, kh, kw, C) in memory: the channels-last layout of (O, C, kh, kw)
  at::Tensor gw;
  if (g.B > 0 && g.C > 0 && g.O > 0 && g.Ho > 0 && g.Wo > 0 && g.H > 0 && g.W > 0) {
    gw = at::empty({g.O, g.kh * g.kw * g.C}, grad.options());   // written by the first product
    const at::Tensor gin = grad.permute({0, 2, 3, 1}).contiguous();   // (B, Ho, Wo, O)
    const at::Tensor xin = input.permute({0, 2, 3, 1}).contiguous();  // (B, H, W, C)
    if (grad.scalar_type() == at::kFloat) {
      weight_grad<float>(g, gin, xin, gw);
    } else {
      weight_grad<double>(g, gin, xin, gw);
    }
  } else {  // no position: a zero gradient
    gw = at::zeros({g.O, g.kh * g.kw * g.C}, grad.options());
  }
  at::Tensor out = gw.view({g.O, g.kh, g.kw, g.C}).permute({0, 3, 1, 2});   // (O, C, kh, kw), channels-last
  return channels_last ? out : out.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) { m.impl("conv2d_weight_grad", &conv2d_weight_grad_cpu); }

}  // namespace fastinpaint

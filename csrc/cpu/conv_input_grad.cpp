// The gradient of a convolution's input where the input has few channels (an image and its
// mask: the first layer of a generator or discriminator), on the CPU. A helper kernel of the
// convolutions of fastinpaint's layers (fastinpaint/ops/_cpu_conv.py), not a public op.
//
// Why: oneDNN computes this gradient as a convolution whose output channels are the input's
// (4 or 5 here), vectorised over them in blocks of 16 lanes, so most of its work is padding:
// at DeepFill v2's first layer (5 -> 48 channels, 5x5, 256x256) it took 4x the forward's time.
// Here it is one matrix product per band of output rows, vectorised over the output channels
// (the product's inner dimension) by torch's GEMM,
//
//     cols (P, kh*kw*C) = grad (P, O) @ W (O, kh*kw*C)        P: the band's output positions
//
// followed by the scatter of each column entry onto the input position it came from (col2im),
// C contiguous values at a time in a channels-last buffer.
//
// Threads: bands of L output rows; band r adds onto input rows that band r + 2 does not reach
// (L is chosen so), so the even bands of every image run in parallel, then the odd ones. L does
// not depend on the thread count, so each element's additions come in the same order whatever
// the threads (the products are torch's GEMM: single-threaded inside a parallel pass, its own
// threading where a pass has a single band).
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "conv_geometry.h"
#include "cpu_common.h"

namespace fastinpaint {
namespace {

using Geometry = ConvGeometry;

// Adds the columns of output rows [i0, i1) of image b (cols: ((i - i0) * Wo + j, ky, kx, c))
// onto gx (channels-last, (B, H, W, C)). NC: the channel count as a constant (0: g.C).
template <typename T, int NC>
void scatter_rows(const Geometry& g, int64_t b, int64_t i0, int64_t i1, const T* FI_RESTRICT cols,
                  T* FI_RESTRICT gx) {
  const int64_t C = NC > 0 ? NC : g.C, K = g.kh * g.kw * C;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t h = i * g.sh - g.ph + ky * g.dh;
      if (h < 0 || h >= g.H) {
        continue;
      }
      T* row = gx + (b * g.H + h) * g.W * C;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        // the output columns j whose input column j * sw - pw + kx * dw lies in [0, W)
        const int64_t off = kx * g.dw - g.pw;
        const int64_t j0 = off >= 0 ? 0 : (-off + g.sw - 1) / g.sw;
        const int64_t j1 = std::min<int64_t>(g.Wo, g.W - 1 - off < 0 ? 0 : (g.W - 1 - off) / g.sw + 1);
        const T* src = cols + ((i - i0) * g.Wo) * K + (ky * g.kw + kx) * C;
        for (int64_t j = j0; j < j1; ++j) {
          T* d = row + (j * g.sw + off) * C;
          const T* s = src + j * K;
          for (int64_t c = 0; c < C; ++c) {
            d[c] += s[c];
          }
        }
      }
    }
  }
}

// Output rows per band: the fewest for which band r and band r + 2 reach disjoint input rows
// ((kh - 1) * dh < (L + 1) * sh), and at least 8 (fewer, smaller products).
int64_t band_rows(const Geometry& g) {
  const int64_t needed = std::max<int64_t>(1, ((g.kh - 1) * g.dh) / g.sh);
  return std::max<int64_t>(needed, 8);
}

// Output rows per matrix product: its columns within about 1 MB (they are read back at once).
int64_t product_rows(const Geometry& g, int64_t esize) {
  const int64_t row_bytes = g.Wo * g.kh * g.kw * g.C * esize;
  return std::max<int64_t>(1, (int64_t{1024} << 10) / std::max<int64_t>(row_bytes, 1));
}

template <typename T>
void input_grad(const Geometry& g, const at::Tensor& gin, const at::Tensor& wm, at::Tensor& gx) {
  const int64_t L = band_rows(g), bands = (g.Ho + L - 1) / L, half = (bands + 1) / 2;
  const int64_t R = std::min(product_rows(g, sizeof(T)), L), K = g.kh * g.kw * g.C;
  T* gxp = gx.data_ptr<T>();
  // the scatter with the channel count a constant (unrolled) for the few channels this is for
  using ScatterFn = void (*)(const Geometry&, int64_t, int64_t, int64_t, const T*, T*);
  static constexpr ScatterFn by_channels[] = {&scatter_rows<T, 0>, &scatter_rows<T, 1>, &scatter_rows<T, 2>,
                                              &scatter_rows<T, 3>, &scatter_rows<T, 4>, &scatter_rows<T, 5>,
                                              &scatter_rows<T, 6>, &scatter_rows<T, 7>, &scatter_rows<T, 8>};
  const ScatterFn scatter = g.C <= 8 ? by_channels[g.C] : &scatter_rows<T, 0>;
  for (int64_t parity = 0; parity < 2; ++parity) {
    const int64_t per_image = parity == 0 ? half : bands / 2;
    parallel_for(0, g.B * per_image, 1, [&](int64_t t0, int64_t t1) {
      at::Tensor buf = at::empty({R * g.Wo, K}, gin.options());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / per_image, band = 2 * (t % per_image) + parity;
        const int64_t r0 = band * L, r1 = std::min(g.Ho, r0 + L);
        for (int64_t i0 = r0; i0 < r1; i0 += R) {
          const int64_t i1 = std::min(r1, i0 + R);
          // rows [i0, i1) of image b, channels-last: a (positions, O) matrix
          const at::Tensor a = gin[b].narrow(0, i0, i1 - i0).reshape({(i1 - i0) * g.Wo, g.O});
          at::Tensor cols = buf.narrow(0, 0, (i1 - i0) * g.Wo);
          at::mm_out(cols, a, wm);
          scatter(g, b, i0, i1, cols.data_ptr<T>(), gxp);
        }
      }
    });
  }
}

at::Tensor conv2d_input_grad_cpu(const at::Tensor& grad, const at::Tensor& weight, at::IntArrayRef input_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 bool channels_last) {
  TORCH_CHECK(weight.dim() == 4, "conv2d_input_grad: weight must be (O, C, kh, kw)");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g = conv_geometry("conv2d_input_grad", grad, weight, "weight", input_size, weight.sizes(), stride,
                                   padding, dilation);
  // (B, H, W, C) in memory: the channels-last layout of (B, C, H, W)
  at::Tensor gx = at::zeros({g.B, g.H, g.W, g.C}, grad.options());
  if (g.B > 0 && g.C > 0 && g.O > 0 && g.Ho > 0 && g.Wo > 0 && g.H > 0 && g.W > 0) {
    const at::Tensor gin = grad.permute({0, 2, 3, 1}).contiguous();   // (B, Ho, Wo, O)
    const at::Tensor wm = weight.permute({0, 2, 3, 1}).reshape({g.O, g.kh * g.kw * g.C});  // (O, (ky, kx, c))
    if (grad.scalar_type() == at::kFloat) {
      input_grad<float>(g, gin, wm.contiguous(), gx);
    } else {
      input_grad<double>(g, gin, wm.contiguous(), gx);
    }
  }
  at::Tensor out = gx.permute({0, 3, 1, 2});   // (B, C, H, W), channels-last strides
  return channels_last ? out : out.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) { m.impl("conv2d_input_grad", &conv2d_input_grad_cpu); }

}  // namespace fastinpaint

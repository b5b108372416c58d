// A 3x3, stride-1 convolution on the CPU by Winograd's minimal filtering F(4x4, 3x3)
// (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016), float32,
// any padding (negative too: a crop) and any dilation.
//
// Each tile of 4x4 outputs (spaced by the dilation: a dilated convolution is an ordinary one
// on each of its dilation^2 interleaved sub-grids) reads 6x6 inputs d and becomes
//     Y = A^T [ sum_c (G g_oc G^T) .* (B^T d_c B) ] A
// so a tile's 16 outputs x Cin x Cout multiply-adds of the direct convolution (144 per pair
// of channels) become 36 products per pair of channels: one batched matrix product
// (36 x [tiles x Cin] @ [Cin x Cout]), the transforms of the inputs before it and of the
// outputs after it (about 2 flops per value each, vectorised over channels).
//
// The work is cut into chunks of tiles; a chunk runs on one thread from end to end (input
// transform, the 36 products by at::bmm, which runs single-threaded inside the parallel
// loop, then the output transform with the bias) so that its buffers stay in that core's
// L2 cache. The weights' transform U = G g G^T is computed per call, vectorised over output
// channels (it is small: 36 x Cin x Cout), so training, which changes the weights every step, needs
// no cache.
//
// `transposed` reads the weight (Cout0, Cin0, 3, 3) as the kernel of the backward to the
// input: the convolution of the output gradient with the weight flipped in both spatial
// axes and its two channel axes swapped (padding 2*dilation - padding of the forward).
//
// Accuracy: F(4x4, 3x3) in float32 rounds more than a direct convolution (the transforms'
// coefficients up to 8 and 1/24); tests/test_winograd.py bounds the error against float64.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"
#include "cpu/layout_copy.h"

namespace fastinpaint {
namespace {

constexpr int kOut = 4;      // outputs per tile side
constexpr int kIn = 6;       // inputs per tile side: kOut + 3 - 1
constexpr int kPoints = 36;  // kIn * kIn

// loads and stores of V (float, or a GCC vector of floats) at any 4-byte alignment
template <typename V>
FI_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
FI_INLINE void store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// r = B^T d for six values d (the input transform along one axis)
struct InputTransform {
  static constexpr int n = kIn;  // values in
  template <typename V>
  static FI_INLINE void apply(const V* d, V* r) {
    r[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    r[1] = d[3] + d[4] - 4.0f * (d[1] + d[2]);
    r[2] = 4.0f * (d[1] - d[2]) - d[3] + d[4];
    r[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    r[4] = 2.0f * (d[1] - d[3]) - d[2] + d[4];
    r[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
  }
};

// o = A^T m for six values m (the output transform along one axis: four outputs)
template <typename V>
FI_INLINE void output_1d(const V* m, V* o) {
  const V a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
  o[0] = m[0] + a + c;
  o[1] = b + 2.0f * d;
  o[2] = a + 4.0f * c;
  o[3] = b + 8.0f * d + m[5];
}

// One tile's two-axis transform (Transform along each axis: n values in, six out) for the
// channels [c, c + lanes): src holds the tile's n x n positions (row-major; a position outside
// the map points at zeros), dst receives point k at dst + k * stride.
template <typename V, typename Transform>
FI_INLINE void transform_tile(const float* const* src, int64_t c, float* dst, int64_t stride) {
  constexpr int n = Transform::n;
  V t[kIn][n];
  for (int j = 0; j < n; ++j) {
    V col[n], r[kIn];
    for (int i = 0; i < n; ++i) {
      col[i] = load<V>(src[i * n + j] + c);
    }
    Transform::apply(col, r);
    for (int i = 0; i < kIn; ++i) {
      t[i][j] = r[i];
    }
  }
  for (int i = 0; i < kIn; ++i) {
    V r[kIn];
    Transform::apply(t[i], r);
    for (int j = 0; j < kIn; ++j) {
      store(dst + (i * kIn + j) * stride, r[j]);
    }
  }
}

// transform_tile over all n channels: L at a time, then one at a time for the tail.
template <int L, typename Transform>
FI_INLINE void transform_channels(const float* const* src, int64_t n, float* dst, int64_t stride) {
  using vf = typename Vec<L>::f;
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    transform_tile<vf, Transform>(src, c, dst + c, stride);
  }
  for (; c < n; ++c) {
    transform_tile<float, Transform>(src, c, dst + c, stride);
  }
}

// One tile's output transform for the channels [o, o + lanes): src holds point k at
// src + k * stride, dst the tile's 16 output positions (row-major; one outside the output
// points at a scratch row).
template <typename V>
FI_INLINE void output_tile(const float* src, int64_t stride, const float* bias, int64_t o, float* const* dst) {
  V t[kOut][kIn];
  for (int j = 0; j < kIn; ++j) {
    V col[kIn], r[kOut];
    for (int i = 0; i < kIn; ++i) {
      col[i] = load<V>(src + (i * kIn + j) * stride);
    }
    output_1d(col, r);
    for (int i = 0; i < kOut; ++i) {
      t[i][j] = r[i];
    }
  }
  const V b = bias != nullptr ? load<V>(bias + o) : V{};
  for (int i = 0; i < kOut; ++i) {
    V r[kOut];
    output_1d(t[i], r);
    for (int j = 0; j < kOut; ++j) {
      store(dst[i * kOut + j] + o, r[j] + b);
    }
  }
}

// m = A y for four values y (the transpose of the output transform, six values: the
// output-gradient transform A dY A^T along one axis)
struct GradTransform {
  static constexpr int n = kOut;  // values in
  template <typename V>
  static FI_INLINE void apply(const V* y, V* m) {
    const V even = y[0] + y[2], odd = y[1] + y[3], even4 = y[0] + 4.0f * y[2], odd8 = 2.0f * y[1] + 8.0f * y[3];
    m[0] = y[0];
    m[1] = even + odd;
    m[2] = even - odd;
    m[3] = even4 + odd8;
    m[4] = even4 - odd8;
    m[5] = y[3];
  }
};

// The problem: x (B, H, W, C) channels-last, the output (B, Ho, Wo, O) channels-last, and
// the tiles as (b, y0, x0) of their first output.
struct Geometry {
  int64_t B, H, W, C, O, Ho, Wo, ph, pw, dh, dw;
  bool nchw = false;  // the output's layout: NCHW, or channels-last
  std::vector<int32_t> tiles;
};

std::vector<int32_t> make_tiles(const Geometry& g) {
  std::vector<int32_t> tiles;
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t py = 0; py < std::min(g.dh, g.Ho); ++py) {
      for (int64_t px = 0; px < std::min(g.dw, g.Wo); ++px) {
        for (int64_t y0 = py; y0 < g.Ho; y0 += kOut * g.dh) {
          for (int64_t x0 = px; x0 < g.Wo; x0 += kOut * g.dw) {
            tiles.push_back(static_cast<int32_t>(b));
            tiles.push_back(static_cast<int32_t>(y0));
            tiles.push_back(static_cast<int32_t>(x0));
          }
        }
      }
    }
  }
  return tiles;
}

// the input transform of tiles [t0, t0 + nt) into V (36, nt, C)
template <int L>
FI_INLINE void input_chunk_body(const float* x, const float* zeros, const Geometry& g, int64_t t0, int64_t nt, int64_t ld,
                                float* V) {
  const float* src[kPoints];
  for (int64_t tl = 0; tl < nt; ++tl) {
    const int32_t* tile = g.tiles.data() + 3 * (t0 + tl);
    const int64_t b = tile[0], y0 = tile[1], x0 = tile[2];
    for (int i = 0; i < kIn; ++i) {
      const int64_t iy = y0 - g.ph + g.dh * i;
      for (int j = 0; j < kIn; ++j) {
        const int64_t ix = x0 - g.pw + g.dw * j;
        const bool inside = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
        src[i * kIn + j] = inside ? x + ((b * g.H + iy) * g.W + ix) * g.C : zeros;
      }
    }
    transform_channels<L, InputTransform>(src, g.C, V + tl * g.C, ld * g.C);
  }
}

// The tile's 16 output positions in a channels-last (B, Ho, Wo, n) map at `base` (the output,
// or the output's gradient), row-major; a position past the map's edge gets `outside`.
template <typename P>
FI_INLINE void output_positions(const Geometry& g, const int32_t* tile, P* base, int64_t n, P* outside, P** ptrs) {
  const int64_t b = tile[0], y0 = tile[1], x0 = tile[2];
  for (int i = 0; i < kOut; ++i) {
    const int64_t oy = y0 + g.dh * i;
    for (int j = 0; j < kOut; ++j) {
      const int64_t ox = x0 + g.dw * j;
      ptrs[i * kOut + j] = oy < g.Ho && ox < g.Wo ? base + ((b * g.Ho + oy) * g.Wo + ox) * n : outside;
    }
  }
}

// the output transform of tiles [t0, t0 + nt) from M (36, nt, O), plus the bias, into out:
// channels-last, each output position's channels written in place; or NCHW (g.nchw), the tile
// gathered in scratch (16 x O floats) and written per channel, rows of 4 contiguous outputs
// at dilation 1. scratch holds 16 * O floats (channels-last: its first O take the outputs
// that fall outside the map).
template <int L>
FI_INLINE void output_chunk_body(const float* M, const float* bias, float* scratch, const Geometry& g, int64_t t0,
                                 int64_t nt, int64_t ld, float* out) {
  using vf = typename Vec<L>::f;
  float* dst[kOut * kOut];
  for (int64_t tl = 0; tl < nt; ++tl) {
    const int32_t* tile = g.tiles.data() + 3 * (t0 + tl);
    const int64_t b = tile[0], y0 = tile[1], x0 = tile[2];
    if (g.nchw) {
      for (int k = 0; k < kOut * kOut; ++k) {
        dst[k] = scratch + k * g.O;
      }
    } else {
      output_positions<float>(g, tile, out, g.O, scratch, dst);
    }
    const float* src = M + tl * g.O;
    int64_t o = 0;
    for (; o + L <= g.O; o += L) {
      output_tile<vf>(src + o, ld * g.O, bias, o, dst);
    }
    for (; o < g.O; ++o) {
      output_tile<float>(src + o, ld * g.O, bias, o, dst);
    }
    if (g.nchw) {
      const int64_t rows = std::min<int64_t>(kOut, (g.Ho - 1 - y0) / g.dh + 1);
      const int64_t cols = std::min<int64_t>(kOut, (g.Wo - 1 - x0) / g.dw + 1);
      for (int64_t oc = 0; oc < g.O; ++oc) {
        float* plane = out + (b * g.O + oc) * g.Ho * g.Wo;
        for (int64_t i = 0; i < rows; ++i) {
          float* row = plane + (y0 + g.dh * i) * g.Wo + x0;
          for (int64_t j = 0; j < cols; ++j) {
            row[g.dw * j] = scratch[(i * kOut + j) * g.O + oc];
          }
        }
      }
    }
  }
}

// the output-gradient transform of tiles [t0, t0 + nt) from gy (B, Ho, Wo, O) into D (36, nt, O)
template <int L>
FI_INLINE void grad_chunk_body(const float* gy, const float* zeros, const Geometry& g, int64_t t0, int64_t nt, int64_t ld,
                               float* D) {
  const float* src[kOut * kOut];
  for (int64_t tl = 0; tl < nt; ++tl) {
    output_positions<const float>(g, g.tiles.data() + 3 * (t0 + tl), gy, g.O, zeros, src);
    transform_channels<L, GradTransform>(src, g.O, D + tl * g.O, ld * g.O);
  }
}

// dg = G^T u for six values u (the gradient of kernel_1d: three values)
template <typename V>
FI_INLINE void kernel_grad_1d(const V* u, V* g) {
  constexpr float q = 1.0f / 4.0f, s = 1.0f / 6.0f, t = 1.0f / 12.0f, v = 1.0f / 24.0f;
  const V pair12 = u[1] + u[2], pair34 = u[3] + u[4];
  g[0] = q * u[0] - s * pair12 + v * pair34;
  g[1] = s * (u[2] - u[1]) + t * (u[3] - u[4]);
  g[2] = s * (pair34 - pair12) + u[5];
}

// dW[o, c] for the output channels [o, o + lanes) from dU (36, C, O): dg = G^T du G
template <typename V>
FI_INLINE void kernel_grad(const float* dU, int64_t C, int64_t O, int64_t c, int64_t o, float* dW) {
  constexpr int lanes = sizeof(V) / sizeof(float);
  V t[kIn][3];
  for (int i = 0; i < kIn; ++i) {
    V u[kIn];
    for (int j = 0; j < kIn; ++j) {
      u[j] = load<V>(dU + ((i * kIn + j) * C + c) * O + o);
    }
    kernel_grad_1d(u, t[i]);  // along the second axis: t[i][b]
  }
  float taps[9][lanes];
  for (int b = 0; b < 3; ++b) {
    V col[kIn], r[3];
    for (int i = 0; i < kIn; ++i) {
      col[i] = t[i][b];
    }
    kernel_grad_1d(col, r);
    for (int a = 0; a < 3; ++a) {
      store(taps[a * 3 + b], r[a]);
    }
  }
  for (int l = 0; l < lanes; ++l) {
    float* dst = dW + ((o + l) * C + c) * 9;
    for (int k = 0; k < 9; ++k) {
      dst[k] = taps[k][l];
    }
  }
}

// dW (O, C, 3, 3) for the input channels [c0, c1) from dU (36, C, O)
template <int L>
FI_INLINE void weight_grad_rows_body(const float* dU, int64_t C, int64_t O, int64_t c0, int64_t c1, float* dW) {
  using vf = typename Vec<L>::f;
  for (int64_t c = c0; c < c1; ++c) {
    int64_t o = 0;
    for (; o + L <= O; o += L) {
      kernel_grad<vf>(dU, C, O, c, o, dW);
    }
    for (; o < O; ++o) {
      kernel_grad<float>(dU, C, O, c, o, dW);
    }
  }
}

using WeightGradRowsFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, float*);
void weight_grad_rows_default(const float* dU, int64_t C, int64_t O, int64_t c0, int64_t c1, float* dW) {
  weight_grad_rows_body<4>(dU, C, O, c0, c1, dW);
}
#if FI_X86_MULTIVERSION
FI_TARGET_V3 void weight_grad_rows_v3(const float* dU, int64_t C, int64_t O, int64_t c0, int64_t c1, float* dW) {
  weight_grad_rows_body<8>(dU, C, O, c0, c1, dW);
}
FI_TARGET_V4 void weight_grad_rows_v4(const float* dU, int64_t C, int64_t O, int64_t c0, int64_t c1, float* dW) {
  weight_grad_rows_body<16>(dU, C, O, c0, c1, dW);
}
#endif

using InputChunkFn = void (*)(const float*, const float*, const Geometry&, int64_t, int64_t, int64_t, float*);
using OutputChunkFn = void (*)(const float*, const float*, float*, const Geometry&, int64_t, int64_t, int64_t, float*);
using GradChunkFn = void (*)(const float*, const float*, const Geometry&, int64_t, int64_t, int64_t, float*);
void grad_chunk_default(const float* gy, const float* zeros, const Geometry& g, int64_t t0, int64_t nt, int64_t ld, float* D) {
  grad_chunk_body<4>(gy, zeros, g, t0, nt, ld, D);
}
void input_chunk_default(const float* x, const float* zeros, const Geometry& g, int64_t t0, int64_t nt, int64_t ld, float* V) {
  input_chunk_body<4>(x, zeros, g, t0, nt, ld, V);
}
void output_chunk_default(const float* M, const float* bias, float* scratch, const Geometry& g, int64_t t0, int64_t nt, int64_t ld,
                          float* out) {
  output_chunk_body<4>(M, bias, scratch, g, t0, nt, ld, out);
}
#if FI_X86_MULTIVERSION
FI_TARGET_V3 void grad_chunk_v3(const float* gy, const float* zeros, const Geometry& g, int64_t t0, int64_t nt, int64_t ld,
                                float* D) {
  grad_chunk_body<8>(gy, zeros, g, t0, nt, ld, D);
}
FI_TARGET_V4 void grad_chunk_v4(const float* gy, const float* zeros, const Geometry& g, int64_t t0, int64_t nt, int64_t ld,
                                float* D) {
  grad_chunk_body<16>(gy, zeros, g, t0, nt, ld, D);
}
FI_TARGET_V3 void input_chunk_v3(const float* x, const float* zeros, const Geometry& g, int64_t t0, int64_t nt, int64_t ld,
                                 float* V) {
  input_chunk_body<8>(x, zeros, g, t0, nt, ld, V);
}
FI_TARGET_V3 void output_chunk_v3(const float* M, const float* bias, float* scratch, const Geometry& g, int64_t t0,
                                  int64_t nt, int64_t ld, float* out) {
  output_chunk_body<8>(M, bias, scratch, g, t0, nt, ld, out);
}
FI_TARGET_V4 void input_chunk_v4(const float* x, const float* zeros, const Geometry& g, int64_t t0, int64_t nt, int64_t ld,
                                 float* V) {
  input_chunk_body<16>(x, zeros, g, t0, nt, ld, V);
}
FI_TARGET_V4 void output_chunk_v4(const float* M, const float* bias, float* scratch, const Geometry& g, int64_t t0,
                                  int64_t nt, int64_t ld, float* out) {
  output_chunk_body<16>(M, bias, scratch, g, t0, nt, ld, out);
}
#endif

// u = G g for three values g (the kernel's transform along one axis: six values)
template <typename V>
FI_INLINE void kernel_1d(const V& g0, const V& g1, const V& g2, V* u) {
  constexpr float q = 1.0f / 4.0f, s = 1.0f / 6.0f, t = 1.0f / 12.0f, v = 1.0f / 24.0f;
  const V even = g0 + g2;
  u[0] = q * g0;
  u[1] = -s * (even + g1);
  u[2] = s * (g1 - even);
  u[3] = v * g0 + t * g1 + s * g2;
  u[4] = v * g0 - t * g1 + s * g2;
  u[5] = g2;
}

// Row ci of U for the output channels [co, co + lanes): taps holds the nine taps of every
// output channel's kernel (tap-major, Cout apart).
template <typename V>
FI_INLINE void kernel_transform(const float* taps, int64_t co, int64_t ci, int64_t Cin, int64_t Cout, float* U) {
  V g[9];
  for (int k = 0; k < 9; ++k) {
    g[k] = load<V>(taps + k * Cout + co);
  }
  V t[3][kIn];  // (G g)^T: t[b][i]
  for (int b = 0; b < 3; ++b) {
    kernel_1d(g[b], g[3 + b], g[6 + b], t[b]);
  }
  for (int i = 0; i < kIn; ++i) {
    V u[kIn];
    kernel_1d(t[0][i], t[1][i], t[2][i], u);
    for (int j = 0; j < kIn; ++j) {
      store(U + ((i * kIn + j) * Cin + ci) * Cout + co, u[j]);
    }
  }
}

// U (36, Cin, Cout) rows [c0, c1) from the weight w (rows, cols, 3, 3); taps: 9 * Cout scratch.
template <int L>
FI_INLINE void weight_rows_body(const float* w, int64_t cols, bool transposed, int64_t c0, int64_t c1, int64_t Cin,
                                int64_t Cout, float* taps, float* U) {
  using vf = typename Vec<L>::f;
  for (int64_t ci = c0; ci < c1; ++ci) {
    for (int64_t co = 0; co < Cout; ++co) {
      const float* k = transposed ? w + (ci * cols + co) * 9 : w + (co * cols + ci) * 9;
      for (int tap = 0; tap < 9; ++tap) {
        taps[tap * Cout + co] = transposed ? k[8 - tap] : k[tap];
      }
    }
    int64_t co = 0;
    for (; co + L <= Cout; co += L) {
      kernel_transform<vf>(taps, co, ci, Cin, Cout, U);
    }
    for (; co < Cout; ++co) {
      kernel_transform<float>(taps, co, ci, Cin, Cout, U);
    }
  }
}

using WeightRowsFn = void (*)(const float*, int64_t, bool, int64_t, int64_t, int64_t, int64_t, float*, float*);
void weight_rows_default(const float* w, int64_t cols, bool transposed, int64_t c0, int64_t c1, int64_t Cin,
                         int64_t Cout, float* taps, float* U) {
  weight_rows_body<4>(w, cols, transposed, c0, c1, Cin, Cout, taps, U);
}
#if FI_X86_MULTIVERSION
FI_TARGET_V3 void weight_rows_v3(const float* w, int64_t cols, bool transposed, int64_t c0, int64_t c1, int64_t Cin,
                                 int64_t Cout, float* taps, float* U) {
  weight_rows_body<8>(w, cols, transposed, c0, c1, Cin, Cout, taps, U);
}
FI_TARGET_V4 void weight_rows_v4(const float* w, int64_t cols, bool transposed, int64_t c0, int64_t c1, int64_t Cin,
                                 int64_t Cout, float* taps, float* U) {
  weight_rows_body<16>(w, cols, transposed, c0, c1, Cin, Cout, taps, U);
}
#endif

// U (36, Cin, Cout) = G g G^T of every 3x3 kernel g. transposed: the kernel of the backward
// to the input (channels swapped, flipped in both spatial axes). One task per block of input
// channels of U, whose 36 rows over the output channels are written in order.
at::Tensor transform_weight(const at::Tensor& weight, bool transposed) {
  const at::Tensor w = weight.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t Cin = transposed ? rows : cols, Cout = transposed ? cols : rows;
  at::Tensor U = at::empty({kPoints, Cin, Cout}, w.options());
  const float* wp = w.data_ptr<float>();
  float* up = U.data_ptr<float>();
  const WeightRowsFn weight_rows = FI_PICK_ISA(weight_rows);
  parallel_for(0, Cin, 8, [&](int64_t c0, int64_t c1) {
    std::vector<float> taps(9 * Cout);
    weight_rows(wp, cols, transposed, c0, c1, Cin, Cout, taps.data(), up);
  });
  return U;
}

// Tiles per chunk: 16 to 128, at least two chunks per thread where there are enough tiles,
// and the chunk's two buffers (36 x tiles x (Cin + Cout) floats) within 8 MB.
int64_t chunk_tiles(int64_t T, int64_t C, int64_t O) {
  const int64_t budget = (int64_t{8} << 20) / (kPoints * 4 * (C + O));
  const int64_t per_thread = (T + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  return std::max<int64_t>(16, std::min<int64_t>({128, budget, per_thread}));
}

// Few tiles (small maps): one pass over all of them per step (each transform a parallel loop
// over the tiles, the products one multi-threaded at::bmm) instead of chunks per thread, which
// would leave threads idle or multiply small products; the buffers within 16 MB.
bool whole_pass(int64_t T, int64_t C, int64_t O) {
  return T <= 64 * at::get_num_threads() && T * kPoints * 4 * (C + O) <= (int64_t{16} << 20);
}

// The geometry of a call (the tiles included) and the channels-last copy of its input.
Geometry make_geometry(const at::Tensor& x, int64_t O, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(padding.size() == 2 && dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1,
              "winograd_conv3x3: padding and dilation are (h, w) pairs, dilation >= 1");
  Geometry g;
  g.B = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.O = O;
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.Ho = g.H + 2 * g.ph - 2 * g.dh;
  g.Wo = g.W + 2 * g.pw - 2 * g.dw;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "winograd_conv3x3: the kernel's span exceeds the padded input");
  g.tiles = make_tiles(g);
  return g;
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                                bool channels_last) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "winograd_conv3x3: x must be (B, C, H, W) and weight (O, C, 3, 3)");
  // the products are float32 whatever autocast region the call runs in (a backward inside
  // one, say): below autocast, on this thread and, through parallel_for, on the workers
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "winograd_conv3x3: float32 only");
  const int64_t O = transposed ? weight.size(1) : weight.size(0);
  TORCH_CHECK((transposed ? weight.size(0) : weight.size(1)) == x.size(1), "winograd_conv3x3: x has ", x.size(1),
              " channels, the weight expects another count");
  Geometry g = make_geometry(x, O, padding, dilation);
  g.nchw = !channels_last;
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == g.O,
                "winograd_conv3x3: bias must be (O,)");
    b = bias->contiguous();
    bp = b.data_ptr<float>();
  }
  at::Tensor out = new_output({g.B, g.O, g.Ho, g.Wo}, x.options(),
                              channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (g.B == 0 || g.O == 0) {
    return out;
  }
  if (g.C == 0) {
    return bp != nullptr ? out.copy_(b.view({1, g.O, 1, 1}).expand_as(out)) : out.zero_();
  }
  const at::Tensor xin = to_channels_last(x);
  const at::Tensor U = transform_weight(weight, transposed);
  const int64_t T = static_cast<int64_t>(g.tiles.size() / 3);
  const std::vector<float> zeros(g.C, 0.0f);
  const float* xp = xin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const InputChunkFn input_chunk = FI_PICK_ISA(input_chunk);
  const OutputChunkFn output_chunk = FI_PICK_ISA(output_chunk);
  if (whole_pass(T, g.C, g.O)) {
    const at::Tensor V = at::empty({kPoints, T, g.C}, xin.options());
    at::Tensor M = at::empty({kPoints, T, g.O}, xin.options());
    float* vp = V.data_ptr<float>();
    const float* mp = M.data_ptr<float>();
    parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) { input_chunk(xp, zeros.data(), g, t0, t1 - t0, T, vp + t0 * g.C); });
    at::bmm_out(M, V, U);
    parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
      std::vector<float> scratch(kOut * kOut * g.O);
      output_chunk(mp + t0 * g.O, bp, scratch.data(), g, t0, t1 - t0, T, op);
    });
    return out;
  }
  const int64_t TC = chunk_tiles(T, g.C, g.O);
  const int64_t chunks = (T + TC - 1) / TC;
  parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor Vbuf = at::empty({kPoints * TC * g.C}, xin.options());
    at::Tensor Mbuf = at::empty({kPoints * TC * g.O}, xin.options());
    std::vector<float> scratch(kOut * kOut * g.O);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t t0 = chunk * TC, nt = std::min(TC, T - t0);
      const at::Tensor V = Vbuf.narrow(0, 0, kPoints * nt * g.C).view({kPoints, nt, g.C});
      at::Tensor M = Mbuf.narrow(0, 0, kPoints * nt * g.O).view({kPoints, nt, g.O});
      input_chunk(xp, zeros.data(), g, t0, nt, nt, V.data_ptr<float>());
      at::bmm_out(M, V, U);
      output_chunk(M.data_ptr<float>(), bp, scratch.data(), g, t0, nt, nt, op);
    }
  });
  return out;
}

// dW (O, C, 3, 3) of the convolution of x by Winograd's transforms: dU[k] (C, O) = sum over
// tiles of V[k]^T D[k] (V the input transform of x, D the output-gradient transform of gy),
// then dg = G^T dU G. One accumulator per task (tasks take fixed runs of chunks), summed in
// order: the result does not depend on the threads' timing.
at::Tensor winograd_conv3x3_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad, at::IntArrayRef padding,
                                            at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && grad.dim() == 4 && x.size(0) == grad.size(0),
              "winograd_conv3x3_weight_grad: x (B, C, H, W) and grad (B, O, Ho, Wo)");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat,
              "winograd_conv3x3_weight_grad: float32 only");
  const Geometry g = make_geometry(x, grad.size(1), padding, dilation);
  TORCH_CHECK(grad.size(2) == g.Ho && grad.size(3) == g.Wo, "winograd_conv3x3_weight_grad: grad must be (B, O, ",
              g.Ho, ", ", g.Wo, ")");
  at::Tensor dW = new_output({g.O, g.C, 3, 3}, x.options(), at::MemoryFormat::Contiguous);
  const int64_t T = static_cast<int64_t>(g.tiles.size() / 3);
  if (T == 0 || g.C == 0 || g.O == 0) {
    return dW.zero_();
  }
  const at::Tensor xin = to_channels_last(x);
  const at::Tensor gin = to_channels_last(grad);
  const std::vector<float> zeros(std::max(g.C, g.O), 0.0f);
  const float* xp = xin.data_ptr<float>();
  const float* gp = gin.data_ptr<float>();
  const InputChunkFn input_chunk = FI_PICK_ISA(input_chunk);
  const GradChunkFn grad_chunk = FI_PICK_ISA(grad_chunk);
  const WeightGradRowsFn weight_grad_rows = FI_PICK_ISA(weight_grad_rows);
  float* dWp = dW.data_ptr<float>();
  if (whole_pass(T, g.C, g.O)) {
    const at::Tensor V = at::empty({kPoints, T, g.C}, xin.options());
    const at::Tensor D = at::empty({kPoints, T, g.O}, xin.options());
    float* vp = V.data_ptr<float>();
    float* dp = D.data_ptr<float>();
    parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
      input_chunk(xp, zeros.data(), g, t0, t1 - t0, T, vp + t0 * g.C);
      grad_chunk(gp, zeros.data(), g, t0, t1 - t0, T, dp + t0 * g.O);
    });
    const at::Tensor dU = at::bmm(V.transpose(1, 2), D);
    const float* up = dU.data_ptr<float>();
    parallel_for(0, g.C, 8, [&](int64_t c0, int64_t c1) { weight_grad_rows(up, g.C, g.O, c0, c1, dWp); });
    return dW;
  }
  const int64_t TC = chunk_tiles(T, g.C, g.O);
  const int64_t chunks = (T + TC - 1) / TC;
  // one accumulator (36 x C x O floats) per task, all of them within 256 MB (512 x 512
  // channels: 37.7 MB each, 6 tasks on a larger machine)
  const int64_t per_acc = kPoints * g.C * g.O * 4;
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>({chunks, at::get_num_threads(), (int64_t{256} << 20) / per_acc}));
  std::vector<at::Tensor> acc(tasks);
  parallel_for(0, tasks, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor Vbuf = at::empty({kPoints * TC * g.C}, xin.options());
    at::Tensor Dbuf = at::empty({kPoints * TC * g.O}, xin.options());
    for (int64_t p = p0; p < p1; ++p) {
      acc[p] = at::empty({kPoints, g.C, g.O}, xin.options());
      const int64_t first = p * chunks / tasks;
      for (int64_t chunk = first; chunk < (p + 1) * chunks / tasks; ++chunk) {
        const int64_t t0 = chunk * TC, nt = std::min(TC, T - t0);
        const at::Tensor V = Vbuf.narrow(0, 0, kPoints * nt * g.C).view({kPoints, nt, g.C});
        const at::Tensor D = Dbuf.narrow(0, 0, kPoints * nt * g.O).view({kPoints, nt, g.O});
        input_chunk(xp, zeros.data(), g, t0, nt, nt, V.data_ptr<float>());
        grad_chunk(gp, zeros.data(), g, t0, nt, nt, D.data_ptr<float>());
        if (chunk == first) {
          at::bmm_out(acc[p], V.transpose(1, 2), D);
        } else {
          acc[p].baddbmm_(V.transpose(1, 2), D);
        }
      }
    }
  });
  for (int64_t p = 1; p < tasks; ++p) {
    acc[0].add_(acc[p]);
  }
  const float* dU = acc[0].data_ptr<float>();
  parallel_for(0, g.C, 8, [&](int64_t c0, int64_t c1) { weight_grad_rows(dU, g.C, g.O, c0, c1, dWp); });
  return dW;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) {
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
  m.impl("winograd_conv3x3_weight_grad", &winograd_conv3x3_weight_grad_cpu);
}

}  // namespace fastinpaint

// CPU kernels of the channel-wise fully connected layer (host code in csrc/channel_fc.h):
// the forward of maps of at most 16 positions in float32 (at most 64 from 4 images) is one fused
// pass (below, "Small maps"); maps of at least 512 positions at 4 to 8 images stream the weight
// once in the forward, and of at least 256 positions at 1 to 3 images once for both gradients
// (below, "Large maps, small batch"); otherwise the GEMMs run through at::bmm (MKL's batched
// GEMM on strided views, no copies of x for NCHW input; CpuKernels::weight_major picks their
// orientation);
// this file holds the two fused elementwise passes, parallelised by
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

// The dense float32 row of the forward epilogue, y[i] = act(t[i] + b[i]), compiled for the
// baseline, x86-64-v3 and v4 (picked by pick_by_isa): the vector width is the loop's speed.
template <int A, bool kBias>
FI_INLINE void dense_forward_body(float* FI_RESTRICT y, const float* FI_RESTRICT t, const float* FI_RESTRICT b,
                                  int64_t n, float slope) {
  for (int64_t i = 0; i < n; ++i) {
    float v = t[i];
    if constexpr (kBias) {
      v += b[i];
    }
    y[i] = act_fwd<A, float>(v, slope);
  }
}
using DenseForwardFn = void (*)(float*, const float*, const float*, int64_t, float);
template <int A, bool kBias>
void dense_forward_default(float* y, const float* t, const float* b, int64_t n, float slope) {
  dense_forward_body<A, kBias>(y, t, b, n, slope);
}
#if FI_X86_MULTIVERSION
template <int A, bool kBias>
FI_TARGET_V3 void dense_forward_v3(float* y, const float* t, const float* b, int64_t n, float slope) {
  dense_forward_body<A, kBias>(y, t, b, n, slope);
}
template <int A, bool kBias>
FI_TARGET_V4 void dense_forward_v4(float* y, const float* t, const float* b, int64_t n, float slope) {
  dense_forward_body<A, kBias>(y, t, b, n, slope);
}
#endif

// Operands: y (out), t, [bias]. A contiguous inner dimension (the usual case: p) takes a
// plain pointer loop that the compiler vectorises.
template <typename T, int A, bool kBias>
void forward_loop(at::TensorIterator& iter, double slope_d) {
  using acc_t = typename AccOf<T>::type;
  const acc_t slope = static_cast<acc_t>(slope_d);
  constexpr int nt = kBias ? 3 : 2;
  DenseForwardFn dense_float = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    dense_float = FI_PICK_ISA_T(dense_forward, A, kBias);
  }
  iter.for_each(
      [slope_m = slope, dense_float](char** data, const int64_t* strides, int64_t n, int64_t m) {
        const acc_t slope = slope_m;  // a local: the member could alias the output for the compiler
        const int64_t* outer = strides + nt;
        constexpr int64_t es = sizeof(T);
        const bool dense = strides[0] == es && strides[1] == es && (!kBias || strides[2] == es);
        for (int64_t j = 0; j < m; ++j) {
          char* y = data[0] + j * outer[0];
          char* t = data[1] + j * outer[1];
          char* b = kBias ? data[2] + j * outer[2] : nullptr;
          if constexpr (std::is_same_v<T, float>) {
            if (dense) {
              dense_float(reinterpret_cast<float*>(y), reinterpret_cast<const float*>(t),
                          reinterpret_cast<const float*>(b), n, slope);
              continue;
            }
          }
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

// t (B, C, P): a view of the GEMM's (C, P, B) result (the orientation of maps larger than the
// batch, strides (1, P * B, B)), y contiguous (B, C, P). The generic loop reads t with a
// stride of B per position (a scalar gather: 1.4 ms of a 32x32, batch-16 forward). Here each
// channel is a P x B transposition in blocks of 16 positions: the block of t (16 x B values)
// stays in L1 while every batch row of y takes 16 contiguous outputs. In parallel over
// channels.
template <typename T, int A, bool kBias>
void forward_transposed(const T* t, const T* bias, T* y, int64_t B, int64_t C, int64_t P, double slope_d) {
  using acc_t = typename AccOf<T>::type;
  const acc_t slope = static_cast<acc_t>(slope_d);
  constexpr int64_t kBlock = 16;
  parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const T* tc = t + c * P * B;
      for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
        const int64_t np = std::min(kBlock, P - p0);
        for (int64_t b = 0; b < B; ++b) {
          T* yr = y + (b * C + c) * P + p0;
          for (int64_t i = 0; i < np; ++i) {
            acc_t v = static_cast<acc_t>(tc[(p0 + i) * B + b]);
            if constexpr (kBias) {
              v += static_cast<acc_t>(bias[c * P + p0 + i]);
            }
            yr[i] = static_cast<T>(act_fwd<A, acc_t>(v, slope));
          }
        }
      }
    }
  });
}

bool tall_backward(const at::Tensor& d, const at::Tensor& x, const at::Tensor& weight, bool need_x,
                   bool need_weight, at::Tensor& dx, at::Tensor& dw);

struct CpuKernels {
  // From benchmarks/channel_fc_gemm_orientation.py (at::bmm alone, interleaved; files
  // benchmarks/results/cpu_channel_fc_gemm_orientation_fp32_20261207.*): the forward's
  // weight-major GEMM (W_c @ X_c^T) was the faster from as many images as positions (B64 P64:
  // 1.18x; B64 P36, B128 P64, B128 P100: 1.56x) and, from 256 positions, from B * P = 8192 (B32
  // P256: 1.09x, B8 P1024: 1.25x, B16 P1024: 1.05x); below those the batch-major one
  // (X_c @ W_c^T: 4.02x at B1 P64, 2.63x at B1 P256, 2.07x at B1 P1024, 1.12x at B4 P1024,
  // 1.28x-1.62x at B8-B64 with fewer images than positions). For dx the batch-major D_c @ W_c
  // was the faster at every shape (1.14x-4.79x) but B128 at 64 and 100 positions (0.96x, 0.92x).
  static bool weight_major(int64_t B, int64_t P, bool for_dx) {
    return !for_dx && (B >= P || (P >= 256 && B * P >= 8192));
  }

  static bool streaming_grads(const at::Tensor& d, const at::Tensor& x, const at::Tensor& weight, bool need_x,
                              bool need_weight, at::Tensor& dx, at::Tensor& dw) {
    return tall_backward(d, x, weight, need_x, need_weight, dx, dw);
  }

  static void forward_epilogue(const at::Tensor& t, const at::Tensor& bias, at::Tensor& y3,
                               int64_t activation, double slope) {
    const int64_t B = y3.size(0), C = y3.size(1), P = y3.size(2);
    const bool has_bias = bias.defined();
    if (t.stride(0) == 1 && t.stride(1) == P * B && t.stride(2) == B && y3.is_contiguous() &&
        (!has_bias || bias.is_contiguous())) {
      dispatch_dtype(t.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        dispatch_act(activation, [&](auto a) {
          constexpr int A = decltype(a)::value;
          const T* bp = has_bias ? bias.data_ptr<T>() : nullptr;
          if (has_bias) {
            forward_transposed<T, A, true>(t.data_ptr<T>(), bp, y3.data_ptr<T>(), B, C, P, slope);
          } else {
            forward_transposed<T, A, false>(t.data_ptr<T>(), bp, y3.data_ptr<T>(), B, C, P, slope);
          }
        });
      });
      return;
    }
    at::TensorIteratorConfig config;
    config.check_all_same_dtype(true).resize_outputs(false);
    // The config borrows its operands: the views live until the loop is done.
    const at::Tensor& tt = t;
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

// ---------------------------------------------------------------------------------------
// Small maps (P = H*W <= 64, float32): one fused pass instead of the batched GEMM. For the
// Context Encoder's 4x4 bottleneck (512 channels) a batched GEMM of 16x16 matrices spends
// its time in per-matrix overhead, and the bias/activation/layout pass then reads its
// result again; at 8x8 (64 positions) the GEMM's (C, B, P) result needs that pass too. Each
// task takes a block of channels and of batch rows: it transposes each W_c into a
// zero-padded (P x NP) buffer (NP = P rounded up to 16, 32, 48 or 64: whole AVX-512
// registers per row), then for R batch rows at a time accumulates
// y[b, c, :] = bias_c + sum_k x[b, c, k] * W_c[:, k] in registers (a broadcast and an FMA
// per k, row and vector, as explicit vectors: left to itself the compiler vectorised across
// the rows instead), and stores act(...) straight into y's layout. The sum runs over k in
// order, one multiply-add per term, as a GEMM's inner product does.
struct SmallArgs {
  const float* x;
  int64_t sxb, sxc, sxp;  // x's (B, C, P) strides
  const float* w;         // (C, P, P) contiguous
  const float* bias;      // (C, P) contiguous, or null
  float* y;
  int64_t syb, syc, syp;  // y's (B, C, P) strides
  int64_t B, C, P, rows;  // rows: batch rows per task
  float slope;
};

// float x 16 as a GCC/Clang vector: one AVX-512 register, two AVX2 or four SSE registers,
// whatever the loop is compiled for; arithmetic with a float broadcasts it.
typedef float fv16 __attribute__((vector_size(64)));

// GCC's __builtin_shuffle of two vectors by a constant index vector (one vpermt2ps in AVX-512);
// Clang spells it differently, and takes the scalar forms below.
#if defined(__GNUC__) && !defined(__clang__)
#define FI_HAS_SHUFFLE 1
typedef int iv16 __attribute__((vector_size(64)));
#else
#define FI_HAS_SHUFFLE 0
#endif

// Transposes W_c (P x P, row-major) into wt (P rows of NP floats): wt[k * NP + i] = W_c[i, k],
// zero for i >= P. With shuffles: in 16 x 16 blocks, each transposed in registers by four
// rounds that swap one bit of the row index with the same bit of the column index (rows r and
// r | 2^b exchange their blocks of 2^b columns: 8 pairs, two shuffles a pair). The
// element-by-element copy (the form without shuffles) reads W_c down its columns, P floats
// apart: with it the pass took 0.94 ms at B16 C256 8x8, with the shuffles 0.42 ms (ad hoc).
#if FI_HAS_SHUFFLE
// Two vectors a, c in blocks of 2^b lanes: swap_lo<b> takes a's even blocks and c's even blocks
// alternately (a0 c0 a2 c2 ...), swap_hi<b> their odd ones (a1 c1 a3 c3 ...). The transposition
// below and the lane sums of hsum16x16 are both built of these.
template <int b>
FI_INLINE iv16 swap_lo() {
  return b == 0 ? iv16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}
       : b == 1 ? iv16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}
       : b == 2 ? iv16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}
                : iv16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
}
template <int b>
FI_INLINE iv16 swap_hi() {
  return swap_lo<b>() + (1 << b);
}

template <int b>
FI_INLINE void transpose_round(fv16 (&m)[16]) {
  for (int r = 0; r < 16; ++r) {
    if ((r & (1 << b)) == 0) {
      const fv16 a = m[r], c = m[r | (1 << b)];
      m[r] = __builtin_shuffle(a, c, swap_lo<b>());
      m[r | (1 << b)] = __builtin_shuffle(a, c, swap_hi<b>());
    }
  }
}
#endif

template <int NP>
FI_INLINE void small_transpose(const float* FI_RESTRICT w, int64_t P, float* FI_RESTRICT wt) {
#if FI_HAS_SHUFFLE
  for (int64_t kb = 0; kb < P; kb += 16) {
    for (int64_t ib = 0; ib < NP; ib += 16) {
      fv16 m[16];  // m[r][j] = W_c[ib + r, kb + j], zero outside
      for (int r = 0; r < 16; ++r) {
        const int64_t i = ib + r;
        if (i < P && kb + 16 <= P) {
          std::memcpy(&m[r], w + i * P + kb, sizeof(fv16));
        } else {
          for (int j = 0; j < 16; ++j) {
            m[r][j] = (i < P && kb + j < P) ? w[i * P + kb + j] : 0.f;
          }
        }
      }
      transpose_round<0>(m);
      transpose_round<1>(m);
      transpose_round<2>(m);
      transpose_round<3>(m);  // m[j][r] = W_c[ib + r, kb + j]
      for (int64_t j = 0; j < 16 && kb + j < P; ++j) {
        std::memcpy(wt + (kb + j) * NP + ib, &m[j], sizeof(fv16));
      }
    }
  }
#else
  for (int64_t k = 0; k < P; ++k) {
    for (int64_t i = 0; i < NP; ++i) {
      wt[k * NP + i] = i < P ? w[i * P + k] : 0.f;
    }
  }
#endif
}

// Rows of a register block: R rows of NP / 16 accumulator vectors. Baseline and x86-64-v3
// builds (16 vector registers, an fv16 taking two or four; 16 columns only, see
// small_wide_available): 8 fv16 accumulators in flight (the FMA's latency times its ports).
// v4 (32 zmm registers), wider rows: 16, so that each weight vector loaded serves more rows.
template <int NP, bool kWide>
constexpr int small_block_rows() {
  if constexpr (kWide && NP > 16) {
    return NP == 32 ? 8 : (NP == 48 ? 5 : 4);
  }
  return 128 / NP;
}

template <int NP, int R, int A>
FI_INLINE void small_rows(const float* FI_RESTRICT x, int64_t sxb, int64_t sxp,
                          const float* FI_RESTRICT wt, const float* FI_RESTRICT bv,
                          float* FI_RESTRICT y, int64_t syb, int64_t syp, int64_t P, float slope) {
  constexpr int V = NP / 16;
  fv16 acc[R][V];
  const fv16* bias = reinterpret_cast<const fv16*>(bv);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      acc[r][v] = bias[v];
    }
  }
  for (int64_t k = 0; k < P; ++k) {
    const fv16* w = reinterpret_cast<const fv16*>(wt + k * NP);  // 64-byte aligned rows
    fv16 wk[V];
    for (int v = 0; v < V; ++v) {
      wk[v] = w[v];
    }
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * sxb + k * sxp];
      for (int v = 0; v < V; ++v) {
        acc[r][v] += xv * wk[v];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * syb;
    if (A != 3 && syp == 1 && P == NP) {  // whole vectors into a dense row: act as selects
      for (int v = 0; v < V; ++v) {
        const fv16 a = acc[r][v];
        fv16 o = a;
        if constexpr (A == 1) {
          o = a < 0.f ? 0.f : a;  // NaN stays NaN, as std::max(v, 0)
        } else if constexpr (A == 2) {
          o = a < 0.f ? a * slope : a;
        }
        std::memcpy(yr + 16 * v, &o, sizeof(o));
      }
      continue;
    }
    alignas(64) float out[NP];
    std::memcpy(out, acc[r], sizeof(out));
    if (syp == 1) {
      for (int64_t i = 0; i < P; ++i) {
        yr[i] = act_fwd<A, float>(out[i], slope);
      }
    } else {
      for (int64_t i = 0; i < P; ++i) {
        yr[i * syp] = act_fwd<A, float>(out[i], slope);
      }
    }
  }
}

// Channels per task: their transposed weights (P x NP floats each) within 32 KB, so they
// stay in the L1/L2 cache while the task's batch rows stream past them.
constexpr int64_t kSmallWeightFloats = 8192;

inline int64_t small_channel_block(int64_t P, int64_t NP) {
  return std::max<int64_t>(1, kSmallWeightFloats / (P * NP));
}

// Tasks [t0, t1): task t is the channel block t / blocks (small_channel_block channels) and
// the batch rows [(t % blocks) * rows, ...). For each register block of rows the task walks
// its channels in order: x[b, c, :] and y[b, c, :] of neighbouring channels are neighbours
// in NCHW memory, so every row is read and written as a stream (one channel's rows lie
// C*P floats apart: walking them first hits one cache set over and over).
template <int NP, int A, bool kWide>
FI_INLINE void small_tasks(const SmallArgs& a, int64_t t0, int64_t t1) {
  const int64_t P = a.P, blocks = (a.B + a.rows - 1) / a.rows;
  const int64_t cb = small_channel_block(P, NP);
  // per channel W_c^T's P rows, then the bias: cb * (P + 1) * NP <= 2 * kSmallWeightFloats
  alignas(64) float wt_all[2 * kSmallWeightFloats];
  int64_t loaded = -1;
  constexpr int R = small_block_rows<NP, kWide>();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = (t / blocks) * cb, c1 = std::min(a.C, c0 + cb);
    if (c0 != loaded) {
      for (int64_t c = c0; c < c1; ++c) {
        float* wt = wt_all + (c - c0) * (P * NP + NP);
        small_transpose<NP>(a.w + c * P * P, P, wt);
        for (int i = 0; i < NP; ++i) {
          wt[P * NP + i] = (a.bias != nullptr && i < P) ? a.bias[c * P + i] : 0.f;
        }
      }
      loaded = c0;
    }
    const int64_t b0 = (t % blocks) * a.rows, b1 = std::min(a.B, b0 + a.rows);
    for (int64_t b = b0; b < b1; b += R) {
      const bool full = b + R <= b1;
      for (int64_t c = c0; c < c1; ++c) {
        const float* wt = wt_all + (c - c0) * (P * NP + NP);
        const float* xb = a.x + c * a.sxc + b * a.sxb;
        float* yb = a.y + c * a.syc + b * a.syb;
        if (full) {
          small_rows<NP, R, A>(xb, a.sxb, a.sxp, wt, wt + P * NP, yb, a.syb, a.syp, P, a.slope);
        } else {
          for (int64_t r = 0; r < b1 - b; ++r) {
            small_rows<NP, 1, A>(xb + r * a.sxb, a.sxb, a.sxp, wt, wt + P * NP, yb + r * a.syb, a.syb,
                                 a.syp, P, a.slope);
          }
        }
      }
    }
  }
}

using SmallFn = void (*)(const SmallArgs&, int64_t, int64_t);

template <int NP, int A>
void small_default(const SmallArgs& a, int64_t t0, int64_t t1) {
  small_tasks<NP, A, false>(a, t0, t1);
}
#if FI_X86_MULTIVERSION
template <int NP, int A>
FI_TARGET_V3 void small_v3(const SmallArgs& a, int64_t t0, int64_t t1) {
  small_tasks<NP, A, false>(a, t0, t1);
}
template <int NP, int A>
FI_TARGET_V4 void small_v4(const SmallArgs& a, int64_t t0, int64_t t1) {
  small_tasks<NP, A, true>(a, t0, t1);
}
#endif


// Up to 16 positions the pass wins at every batch (a 16 x 16 transposition is cheap next to the
// per-matrix overhead it saves). From 17 to 64 positions the transposition of each W_c is paid
// per call, and below 4 images the batched GEMM, which reads W_c as it lies, stays faster
// (8x8, 256 channels, leaky_relu: 0.55x of it at batch 1, 1.13x at 4, 1.21x at 8; ad-hoc timing).
// Those maps take the pass in its AVX-512 build alone: the x86-64-v3 and baseline builds took
// 21.9 and 19.1 ms at B64 C256 8x8 against 1.9 ms (ATEN_CPU_CAPABILITY=avx2 / default on an
// AVX-512 machine; the cause was not established), slower than the GEMM.
constexpr int64_t kSmallMaxP = 64, kSmallFullP = 16, kSmallMinB = 4;

bool small_wide_available() {
#if FI_X86_MULTIVERSION
  return isa_level() == 2;
#else
  return false;
#endif
}

// P rounded up to whole 16-float vectors.
int64_t small_padded(int64_t P) {
  return (P + 15) / 16 * 16;
}

bool small_forward_applies(const at::Tensor& x) {
  const int64_t P = x.size(2) * x.size(3);
  return x.scalar_type() == at::kFloat && x.numel() > 0 &&
         (P <= kSmallFullP || (P <= kSmallMaxP && x.size(0) >= kSmallMinB && small_wide_available()));
}

// The operands of the fused forwards (small maps, large maps): y in x's format, x and y as
// (B, C, P) views, the weight and the bias (undefined without one) contiguous.
struct FusedOperands {
  int64_t B, C, P;
  at::Tensor y, x3, y3, w, b;
};

FusedOperands fused_operands(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor y = new_output({B, C, H, W}, x.options(), channel_fc::output_format(x));
  at::Tensor y3 = channel_fc::as_bcp(y);
  return {B, C, H * W, y, channel_fc::as_bcp(x), y3, weight.contiguous(),
          (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor()};
}

at::Tensor small_forward(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, int64_t activation,
                         double negative_slope) {
  const FusedOperands o = fused_operands(x, weight, bias);
  const int64_t B = o.B, C = o.C, P = o.P;
  const at::Tensor &y = o.y, &x3 = o.x3, &y3 = o.y3, &w = o.w, &b = o.b;
  SmallArgs a{x3.data_ptr<float>(), x3.stride(0), x3.stride(1), x3.stride(2),
              w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
              y3.data_ptr<float>(), y3.stride(0), y3.stride(1), y3.stride(2),
              B, C, P, 0, static_cast<float>(negative_slope)};
  // Batch blocks of 64 rows: enough tasks to share out even for few channels, and the
  // transposed W_c reused over a block.
  a.rows = std::min<int64_t>(B, 64);
  const int64_t NP = small_padded(P);
  const int64_t cb = small_channel_block(P, NP);
  const int64_t tasks = ((C + cb - 1) / cb) * ((B + a.rows - 1) / a.rows);
  SmallFn fn = nullptr;
  dispatch_act(activation, [&](auto act) {
    constexpr int A = decltype(act)::value;
    if (NP == 16) {
      fn = FI_PICK_ISA_T(small, 16, A);
    } else {  // small_wide_available()
#if FI_X86_MULTIVERSION
      fn = NP == 32 ? &small_v4<32, A> : (NP == 48 ? &small_v4<48, A> : &small_v4<64, A>);
#endif
    }
  });
  // rows * cb * P^2 multiply-adds a task: tasks of at least ~64K each
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, a.rows * cb * P * P));
  parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  return y;
}

// ---------------------------------------------------------------------------------------
// Large maps, small batch (float32, x's positions contiguous; the limits below): one pass that
// streams each W_c once. The batched GEMM here is (B x P) @ (P x P) per channel with B a handful
// of rows, memory-bound on the weight (each value used B times); MKL's bmm reads it at nearly
// the rate of a plain copy at 1 to 3 images, but from 4 images on its time jumps (C64 32x32:
// 9.7 ms at batch 1, 11.2 at 3, 20.0 at 4; the W_c @ X_c^T orientation took 20-26 ms at every
// batch to 8). Here each task takes a channel and a band of rows of W_c:
// y[b, c, p] = act(bias[c, p] + W_c[p, :] . x[b, c, :]), R rows by NB images at a time as R x NB
// dot products in 16-lane partial sums (a row of W_c and a row of x are both contiguous), reduced
// at the end of the row; the task's rows stay in L1 across the images, the channel's B rows of x
// (B * P floats) in L2.
struct TallArgs {
  const float* x;
  int64_t sxb, sxc;  // x's (B, C, P) strides; along P: 1
  const float* w;    // (C, P, P) contiguous
  const float* bias;  // (C, P) contiguous, or null
  float* y;
  int64_t syb, syc, syp;  // y's (B, C, P) strides
  int64_t B, C, P, rows;  // rows: rows of W_c per task
  float slope;
};

FI_INLINE float hsum16(fv16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) {
    s += v[i];
  }
  return s;
}

#if FI_HAS_SHUFFLE

// The lane sums of 16 vectors at once: four rounds that each add two vectors' halves, quarters,
// pairs, then single lanes (30 shuffles and 15 adds, where one vector at a time takes about 8
// operations, 16 scalar additions as written in hsum16). out[i] = the sum of v[i]'s lanes.
FI_INLINE void hsum16x16(const fv16 (&v)[16], float* out) {
  fv16 u[8], w[4], z[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-7: v[2i]'s half sums, 8-15: v[2i+1]'s
    u[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], swap_lo<3>()) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1], swap_hi<3>());
  }
  for (int i = 0; i < 4; ++i) {  // groups of 4 lanes: v[4i], v[4i+2], v[4i+1], v[4i+3]
    w[i] = __builtin_shuffle(u[2 * i], u[2 * i + 1], swap_lo<2>()) +
           __builtin_shuffle(u[2 * i], u[2 * i + 1], swap_hi<2>());
  }
  for (int i = 0; i < 2; ++i) {  // pairs of lanes: v[8i + {0, 4, 2, 6, 1, 5, 3, 7}]
    z[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], swap_lo<1>()) +
           __builtin_shuffle(w[2 * i], w[2 * i + 1], swap_hi<1>());
  }
  // lane 2m: v[order[m]], lane 2m + 1: v[8 + order[m]]
  const fv16 f = __builtin_shuffle(z[0], z[1], swap_lo<0>()) + __builtin_shuffle(z[0], z[1], swap_hi<0>());
  constexpr int order[8] = {0, 4, 2, 6, 1, 5, 3, 7};
  for (int m = 0; m < 8; ++m) {
    out[order[m]] = f[2 * m];
    out[8 + order[m]] = f[2 * m + 1];
  }
}
#endif

// Rows [p, p + R) of W_c by images [b, b + NB): whole 16-lane steps in vectors, the last
// P % 16 columns scalar.
template <int R, int NB, int A>
FI_INLINE void tall_block(const TallArgs& a, const float* FI_RESTRICT wc, const float* FI_RESTRICT xc, float* yc,
                          const float* bc, int64_t p, int64_t b) {
  const int64_t P = a.P, P16 = P / 16 * 16;
  fv16 acc[R][NB];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NB; ++j) {
      acc[r][j] = fv16{};
    }
  }
  for (int64_t k = 0; k < P16; k += 16) {
    fv16 wv[R], xv[NB];
    for (int r = 0; r < R; ++r) {
      std::memcpy(&wv[r], wc + (p + r) * P + k, sizeof(fv16));
    }
    for (int j = 0; j < NB; ++j) {
      std::memcpy(&xv[j], xc + (b + j) * a.sxb + k, sizeof(fv16));
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < NB; ++j) {
        acc[r][j] += wv[r] * xv[j];
      }
    }
  }
  float sums[R * NB];
#if FI_HAS_SHUFFLE
  if constexpr (R * NB == 16) {
    hsum16x16(reinterpret_cast<const fv16(&)[16]>(acc), sums);
  } else
#endif
  {
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < NB; ++j) {
        sums[r * NB + j] = hsum16(acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* wr = wc + (p + r) * P;
    for (int j = 0; j < NB; ++j) {
      const float* xr = xc + (b + j) * a.sxb;
      float v = sums[r * NB + j];
      for (int64_t k = P16; k < P; ++k) {
        v += wr[k] * xr[k];
      }
      if (bc != nullptr) {
        v += bc[p + r];
      }
      yc[(b + j) * a.syb + (p + r) * a.syp] = act_fwd<A, float>(v, a.slope);
    }
  }
}

template <int R, int NB, int A>
FI_INLINE void tall_tasks(const TallArgs& a, int64_t t0, int64_t t1) {
  const int64_t bands = (a.P + a.rows - 1) / a.rows;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c = t / bands, p0 = (t % bands) * a.rows, p1 = std::min(a.P, p0 + a.rows);
    const float* wc = a.w + c * a.P * a.P;
    const float* xc = a.x + c * a.sxc;
    float* yc = a.y + c * a.syc;
    const float* bc = a.bias != nullptr ? a.bias + c * a.P : nullptr;
    int64_t p = p0;
    for (; p + R <= p1; p += R) {
      int64_t b = 0;
      for (; b + NB <= a.B; b += NB) {
        tall_block<R, NB, A>(a, wc, xc, yc, bc, p, b);
      }
      for (; b < a.B; ++b) {
        tall_block<R, 1, A>(a, wc, xc, yc, bc, p, b);
      }
    }
    for (; p < p1; ++p) {
      for (int64_t b = 0; b < a.B; ++b) {
        tall_block<1, 1, A>(a, wc, xc, yc, bc, p, b);
      }
    }
  }
}

using TallFn = void (*)(const TallArgs&, int64_t, int64_t);

// 4 x 4 blocks (16 accumulators, one AVX-512 register each) for AVX-512; 2 x 2 where a 16-lane
// vector is two AVX2 (or four SSE) registers.
template <int A>
void tall_default(const TallArgs& a, int64_t t0, int64_t t1) {
  tall_tasks<2, 2, A>(a, t0, t1);
}
#if FI_X86_MULTIVERSION
template <int A>
FI_TARGET_V3 void tall_v3(const TallArgs& a, int64_t t0, int64_t t1) {
  tall_tasks<2, 2, A>(a, t0, t1);
}
template <int A>
FI_TARGET_V4 void tall_v4(const TallArgs& a, int64_t t0, int64_t t1) {
  tall_tasks<4, 4, A>(a, t0, t1);
}
#endif


// The forward's limits, from timings of this pass against the GEMM path (X_c @ W_c^T and the
// epilogue) in alternation, 64 channels, leaky_relu (ad hoc, not kept): at 1024 positions 0.86x
// of the GEMM path's speed at 1 and 2 images, 0.81x at 3, 1.66x at 4, 1.44x at 6; at 576
// positions 0.86x at 1 and 2, 1.22x at 4; at 256 positions 0.71x-0.94x at every batch to 8.
// From 16 images the products, not the weight's reading, bound the time (a 4x4 block of rows by
// images is 8 loads per 16 FMAs), as they bound MKL's.
constexpr int64_t kTallMinP = 512, kTallMinB = 4, kTallMaxB = 8, kTallRows = 64;

// x's layout and type as the streaming passes read it: float32, positions contiguous.
bool tall_layout(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && x.numel() > 0 && channel_fc::as_bcp(x).stride(2) == 1;
}

bool tall_forward_applies(const at::Tensor& x) {
  const int64_t B = x.size(0), P = x.size(2) * x.size(3);
  return P >= kTallMinP && B >= kTallMinB && B <= kTallMaxB && tall_layout(x);
}

at::Tensor tall_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t activation, double negative_slope) {
  const FusedOperands o = fused_operands(x, weight, bias);
  const int64_t B = o.B, C = o.C, P = o.P;
  const at::Tensor &y = o.y, &x3 = o.x3, &y3 = o.y3, &w = o.w, &b = o.b;
  TallArgs a{x3.data_ptr<float>(), x3.stride(0), x3.stride(1), w.data_ptr<float>(),
             b.defined() ? b.data_ptr<float>() : nullptr, y3.data_ptr<float>(), y3.stride(0), y3.stride(1),
             y3.stride(2), B, C, P, kTallRows, static_cast<float>(negative_slope)};
  TallFn fn = nullptr;
  dispatch_act(activation, [&](auto act) { fn = FI_PICK_ISA_T(tall, decltype(act)::value); });
  const int64_t tasks = C * ((P + kTallRows - 1) / kTallRows);
  parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  return y;
}

// The backward of the same shapes: for each row p of W_c, in order, dW[c, p, :] = sum_b
// d[b, c, p] x[b, c, :] (written once) and dx[b, c, :] += d[b, c, p] W[c, p, :] (the B rows of
// dx accumulate in a per-task buffer of B * P floats, in L1/L2): one read of the weight and one
// write of its gradient, where the two batched GEMMs read the weight, wrote dW and then copied
// dx into x's layout. One task per channel (a channel's rows add into the same dx rows); the
// sums over p run in order, whatever the threads.
struct TallGradArgs {
  const float* d;   // (C, B, P) view: strides sdc, sdb, 1
  int64_t sdc, sdb;
  const float* x;   // (B, C, P): strides sxb, sxc, 1
  int64_t sxb, sxc;
  const float* w;   // (C, P, P) contiguous
  float* dx;        // (B, C, P): strides sgb, sgc, sgp; null when not needed
  int64_t sgb, sgc, sgp;
  float* dw;        // (C, P, P) contiguous; null when not needed
  int64_t B, P;
};

template <int NB>
FI_INLINE void tall_grad_channel(const TallGradArgs& a, int64_t c, float* FI_RESTRICT acc) {
  const int64_t P = a.P, P16 = P / 16 * 16;
  const float* dc = a.d + c * a.sdc;
  const float* xc = a.x + c * a.sxc;
  const float* wc = a.w + c * P * P;
  float* dwc = a.dw != nullptr ? a.dw + c * P * P : nullptr;
  if (a.dx != nullptr) {
    std::fill(acc, acc + NB * P, 0.f);
  }
  for (int64_t p = 0; p < P; ++p) {
    float dv[NB];
    for (int j = 0; j < NB; ++j) {
      dv[j] = dc[j * a.sdb + p];
    }
    const float* wr = wc + p * P;
    float* dwr = dwc != nullptr ? dwc + p * P : nullptr;
    int64_t k = 0;
    for (; k < P16; k += 16) {
      fv16 xv[NB];
      for (int j = 0; j < NB; ++j) {
        std::memcpy(&xv[j], xc + j * a.sxb + k, sizeof(fv16));
      }
      if (dwr != nullptr) {
        fv16 g = xv[0] * dv[0];
        for (int j = 1; j < NB; ++j) {
          g += xv[j] * dv[j];
        }
        std::memcpy(dwr + k, &g, sizeof(fv16));
      }
      if (a.dx != nullptr) {
        fv16 wv;
        std::memcpy(&wv, wr + k, sizeof(fv16));
        for (int j = 0; j < NB; ++j) {
          fv16 s;
          std::memcpy(&s, acc + j * P + k, sizeof(fv16));
          s += wv * dv[j];
          std::memcpy(acc + j * P + k, &s, sizeof(fv16));
        }
      }
    }
    for (; k < P; ++k) {
      if (dwr != nullptr) {
        float g = xc[k] * dv[0];
        for (int j = 1; j < NB; ++j) {
          g += xc[j * a.sxb + k] * dv[j];
        }
        dwr[k] = g;
      }
      if (a.dx != nullptr) {
        for (int j = 0; j < NB; ++j) {
          acc[j * P + k] += wr[k] * dv[j];
        }
      }
    }
  }
  if (a.dx != nullptr) {
    for (int j = 0; j < NB; ++j) {
      float* gr = a.dx + j * a.sgb + c * a.sgc;
      for (int64_t k = 0; k < P; ++k) {
        gr[k * a.sgp] = acc[j * P + k];
      }
    }
  }
}

using TallGradFn = void (*)(const TallGradArgs&, int64_t, float*);

template <int NB>
void tall_grad_default(const TallGradArgs& a, int64_t c, float* acc) {
  tall_grad_channel<NB>(a, c, acc);
}
#if FI_X86_MULTIVERSION
template <int NB>
FI_TARGET_V3 void tall_grad_v3(const TallGradArgs& a, int64_t c, float* acc) {
  tall_grad_channel<NB>(a, c, acc);
}
template <int NB>
FI_TARGET_V4 void tall_grad_v4(const TallGradArgs& a, int64_t c, float* acc) {
  tall_grad_channel<NB>(a, c, acc);
}
#endif


// The backward's limits: each chunk of 16 weights costs B loads and stores of dx's accumulators
// and B of x's rows. Timed against the GEMMs (D_c @ W_c for dx, D_c^T @ X_c for dW) in
// alternation, 64 channels, leaky_relu (ad hoc, not kept): at 1024 positions 1.09x and 1.12x at
// 1 and 2 images, 0.95x at 4, 0.87x at 6; at 256 positions 1.01x, 1.29x and 1.07x at 1, 2 and 4.
constexpr int64_t kTallGradMinP = 256, kTallGradMaxB = 3;

bool tall_backward(const at::Tensor& d, const at::Tensor& x, const at::Tensor& weight, bool need_x,
                   bool need_weight, at::Tensor& dx, at::Tensor& dw) {
  if (x.size(2) * x.size(3) < kTallGradMinP || x.size(0) > kTallGradMaxB || !tall_layout(x) || d.stride(2) != 1) {
    return false;
  }
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const at::Tensor x3 = channel_fc::as_bcp(x);
  const at::Tensor w = weight.contiguous();
  dx = need_x ? new_output(x.sizes(), x.options(), channel_fc::output_format(x)) : at::empty({0}, x.options());
  dw = need_weight ? at::empty({C, P, P}, x.options()) : at::empty({0}, x.options());
  const at::Tensor dx3 = need_x ? channel_fc::as_bcp(dx) : at::Tensor();
  TallGradArgs a{d.data_ptr<float>(), d.stride(0), d.stride(1), x3.data_ptr<float>(), x3.stride(0), x3.stride(1),
                 w.data_ptr<float>(), need_x ? dx3.data_ptr<float>() : nullptr, need_x ? dx3.stride(0) : 0,
                 need_x ? dx3.stride(1) : 0, need_x ? dx3.stride(2) : 0,
                 need_weight ? dw.data_ptr<float>() : nullptr, B, P};
  TallGradFn fn = nullptr;
  switch (B) {  // the images in registers: one instance per count up to kTallGradMaxB
    case 1: fn = FI_PICK_ISA_T(tall_grad, 1); break;
    case 2: fn = FI_PICK_ISA_T(tall_grad, 2); break;
    default: fn = FI_PICK_ISA_T(tall_grad, 3); break;
  }
  static_assert(kTallGradMaxB == 3, "one instance per image count");
  parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> acc(need_x ? B * P : 0);
    for (int64_t c = c0; c < c1; ++c) {
      fn(a, c, acc.data());
    }
  });
  return true;
}

at::Tensor channel_fc_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t activation,
                                  double negative_slope) {
  channel_fc::check_forward(x, weight, bias, activation, negative_slope, c10::DeviceType::CPU);
  if (small_forward_applies(x)) {
    return small_forward(x, weight, bias, activation, negative_slope);
  }
  if (tall_forward_applies(x)) {
    return tall_forward(x, weight, bias, activation, negative_slope);
  }
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

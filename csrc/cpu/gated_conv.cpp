// CPU kernels of the gated convolution's fused gating (DeepFill v2):
//   y = act(f) * sigmoid(g),  f = pre[:, :C], g = pre[:, C:]
// and its backward (act and sigmoid are recomputed from pre); and the forward from a
// channels-last pre into an NCHW y (gated_conv_act_forward_nchw: an NCHW layer whose
// convolution ran channels-last), the gating of each tile of positions transposed on its way out.
//
// Both memory layouts are read as rows x {feature, gate} x inner (gated_conv.h, gate_layout).
// The (rows x inner) problem is cut into tasks of whole or partial rows by the CPU kernels'
// parallel loop (run_rows, parallel_for), so the inner loop is a plain, contiguous,
// vectorisable loop.
//
// float32 (and the half types, computed in float) use a branch-free exp written in plain
// C++ so that gcc vectorises it. On x86-64 with gcc the hot loops are compiled three times
// (baseline, x86-64-v3 = AVX2+FMA, x86-64-v4 = AVX-512) and the best one the CPU supports,
// capped by torch's own CPU capability (ATEN_CPU_CAPABILITY), is picked at run time.
// float64 (gradcheck only) uses std::exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "gated_conv.h"
#include "cpu/cpu_common.h"
#include "cpu/transpose.h"

namespace fastinpaint {
namespace {

// ---------------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------------

FI_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
FI_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// c ? a : b without a branch. gcc's code sinking moves arithmetic that feeds only one arm
// of a ?: into that arm, and then refuses to if-convert it (the float op could trap), so
// the loop would not vectorise on AVX2 / SSE; a select on the bits keeps it straight-line.
FI_INLINE float blend(bool c, float a, float b) {
  const uint32_t m = 0u - uint32_t(c);
  return f32_from_bits((f32_bits(a) & m) | (f32_bits(b) & ~m));
}
FI_INLINE double blend(bool c, double a, double b) { return c ? a : b; }

// exp(x) for float, branch-free so that it vectorises: x = n*ln2 + r, |r| <= ln2/2,
// exp(x) = 2^n * (1 + u(r)), u(r) = r + r^2 q(r) a degree-6 polynomial (relative error
// ~3e-9, so the result is within ~1 ulp). x is clamped to [-87, 88] so that 2^n stays a
// normal number and the result finite: exp(x < -87) gives exp(-87) ~ 1.6e-38 instead of a
// denormal or 0, which callers only ever add to 1 or subtract 1 from. NaN propagates (the
// clamps keep it). The clamps are bit selects: with ?: gcc folds the clamped constant
// through the arithmetic into a branch and the loop no longer vectorises.
struct ExpParts {
  float scale;  // 2^n
  float u;      // exp(r) - 1
};

FI_INLINE ExpParts exp_parts(float x) {
  x = blend(x < -87.0f, -87.0f, x);
  x = blend(x > 88.0f, 88.0f, x);
  // Round x*log2(e) to the nearest integer n by adding 1.5*2^23: n lands in the low
  // mantissa bits of t (|n| <= 127).
  const float kShifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + kShifter;
  const float n = t - kShifter;
  // Cody-Waite: ln2 = kLn2Hi + kLn2Lo, kLn2Hi has few mantissa bits so n*kLn2Hi is exact.
  const float kLn2Hi = 0.693145751953125f;
  const float kLn2Lo = 1.428606765330187e-06f;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // 2^n: the exponent field is n + 127, in [1, 254].
  const float scale = f32_from_bits((f32_bits(t) - 0x4B400000u + 127u) << 23);
  // exp(r) - 1 = r + r^2 * q(r), q fitted (minimax, relative) on [-ln2/2, ln2/2].
  float q = 1.381458016e-03f;
  q = q * r + 8.368705399e-03f;
  q = q * r + 4.166838899e-02f;
  q = q * r + 1.666652113e-01f;
  q = q * r + 4.999999404e-01f;
  return {scale, r + (r * r) * q};
}

FI_INLINE float exp_f32(float x) {
  const ExpParts e = exp_parts(x);
  return (1.0f + e.u) * e.scale;
}

// exp(x) and exp(x) - 1; the latter without cancellation near 0 (2^n - 1 is exact for
// the n that matter), as torch's elu (expm1).
FI_INLINE void exp_expm1(float x, float& e, float& em1) {
  const ExpParts p = exp_parts(x);
  e = (1.0f + p.u) * p.scale;
  em1 = p.u * p.scale + (p.scale - 1.0f);
}
FI_INLINE void exp_expm1(double x, double& e, double& em1) {
  e = std::exp(x);
  em1 = std::expm1(x);
}

FI_INLINE double exp_any(double x) { return std::exp(x); }
FI_INLINE float exp_any(float x) { return exp_f32(x); }

template <typename acc_t>
FI_INLINE acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + exp_any(-g));
}

// act(f). NaN propagates as in torch's relu / leaky_relu / elu.
template <int A, typename acc_t>
FI_INLINE acc_t act_fwd(acc_t f, acc_t slope) {
  if constexpr (A == 1) {
    return f < acc_t(0) ? acc_t(0) : f;
  } else if constexpr (A == 2) {
    return blend(f < acc_t(0), f * slope, f);
  } else if constexpr (A == 3) {
    acc_t e, em1;  // only used where f <= 0
    exp_expm1(f, e, em1);
    return blend(f <= acc_t(0), em1, f);
  } else {
    return f;
  }
}

// act(f) and act'(f); act' follows torch's backward formulas at 0 and for NaN.
template <int A, typename acc_t>
FI_INLINE void act_fwd_bwd(acc_t f, acc_t slope, acc_t& a, acc_t& da) {
  if constexpr (A == 1) {
    a = f < acc_t(0) ? acc_t(0) : f;
    da = f <= acc_t(0) ? acc_t(0) : acc_t(1);
  } else if constexpr (A == 2) {
    a = blend(f < acc_t(0), f * slope, f);
    da = f > acc_t(0) ? acc_t(1) : slope;
  } else if constexpr (A == 3) {
    acc_t e, em1;
    exp_expm1(f, e, em1);
    a = blend(f <= acc_t(0), em1, f);
    da = blend(f <= acc_t(0), e, acc_t(1));
  } else {
    a = f;
    da = acc_t(1);
  }
}

// ---------------------------------------------------------------------------------------
// Element access: every type is loaded to and stored from its compute type acc_t (float,
// or double for double). The half conversions are written here, branch-free and with
// integer-mask selects, because c10's scalar conversions do not vectorise (gcc keeps a
// branch around their float arithmetic). Rounding is to nearest even, as in c10.
// ---------------------------------------------------------------------------------------

// IEEE half -> float, exact (denormals included).
FI_INLINE float half_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers, inf and NaN: shift exponent and mantissa into place, re-bias by 2^-112.
  const float normal = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * f32_from_bits(15u << 23);
  // Zero and denormals: mantissa * 2^-24, built as (0.5 + m * 2^-24) - 0.5.
  const float denormal = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_denormal = 0u - uint32_t(two_w < (1u << 27));
  return f32_from_bits(sign | (f32_bits(denormal) & is_denormal) |
                       (f32_bits(normal) & ~is_denormal));
}

// float -> IEEE half, round to nearest even; overflow to inf, NaN to a quiet NaN.
FI_INLINE uint16_t f32_to_half(float f) {
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // |f| * 2^112 * 2^-110: rounds away the bits below half precision and overflows to inf.
  float base = (f32_from_bits(w & 0x7FFFFFFFu) * f32_from_bits(239u << 23)) *
               f32_from_bits(17u << 23);
  uint32_t bias = shl1_w & 0xFF000000u;
  const uint32_t tiny = 0u - uint32_t(bias < 0x71000000u);
  bias = (0x71000000u & tiny) | (bias & ~tiny);
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t nan = 0u - uint32_t(shl1_w > 0xFF000000u);
  return uint16_t((sign >> 16) | (0x7E00u & nan) | (nonsign & ~nan));
}

FI_INLINE float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
FI_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - uint32_t((u & 0x7FFFFFFFu) > 0x7F800000u);
  return uint16_t((((u >> 16) | 0x0040u) & nan) | (rounded & ~nan));
}

template <typename T>
struct Io {
  using acc_t = T;  // float and double
  static FI_INLINE acc_t load(const T* p, int64_t i) { return p[i]; }
  static FI_INLINE void store(T* p, int64_t i, acc_t v) { p[i] = v; }
};
template <>
struct Io<c10::Half> {
  using acc_t = float;
  static FI_INLINE float load(const c10::Half* p, int64_t i) { return half_to_f32(p[i].x); }
  static FI_INLINE void store(c10::Half* p, int64_t i, float v) { p[i].x = f32_to_half(v); }
};
template <>
struct Io<c10::BFloat16> {
  using acc_t = float;
  static FI_INLINE float load(const c10::BFloat16* p, int64_t i) { return bf16_to_f32(p[i].x); }
  static FI_INLINE void store(c10::BFloat16* p, int64_t i, float v) {
    p[i].x = f32_to_bf16(v);
  }
};

// ---------------------------------------------------------------------------------------
// Loops
// ---------------------------------------------------------------------------------------

template <int A, typename T>
FI_INLINE void forward_row(const T* FI_RESTRICT f, const T* FI_RESTRICT g, T* FI_RESTRICT y,
                           int64_t n, typename Io<T>::acc_t slope) {
  using acc_t = typename Io<T>::acc_t;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t fv = Io<T>::load(f, i);
    const acc_t gv = Io<T>::load(g, i);
    Io<T>::store(y, i, act_fwd<A, acc_t>(fv, slope) * sigmoid<acc_t>(gv));
  }
}

template <int A, typename T>
FI_INLINE void backward_row(const T* FI_RESTRICT dy, const T* FI_RESTRICT f,
                            const T* FI_RESTRICT g, T* FI_RESTRICT df, T* FI_RESTRICT dg,
                            int64_t n, typename Io<T>::acc_t slope) {
  using acc_t = typename Io<T>::acc_t;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t dyv = Io<T>::load(dy, i);
    const acc_t fv = Io<T>::load(f, i);
    const acc_t gv = Io<T>::load(g, i);
    acc_t a, da;
    act_fwd_bwd<A, acc_t>(fv, slope, a, da);
    const acc_t s = sigmoid<acc_t>(gv);
    const acc_t dys = dyv * s;
    Io<T>::store(df, i, dys * da);
    Io<T>::store(dg, i, dys * a * (acc_t(1) - s));
  }
}

// 2-D loops in TensorIterator's form (run_rows calls them). Forward operands: y, f, g;
// backward operands: df, dg, dy, f, g. strides[k] is operand k's inner stride in bytes,
// strides[ntensors + k] its outer stride. The inner dimension is contiguous (element-size
// strides); the strided variant, a plain scalar loop, is there for any other caller.
template <typename T>
FI_INLINE T* at_byte(char* base, int64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

template <int A, typename T>
FI_INLINE void forward_loop_act(char** data, const int64_t* strides, int64_t n, int64_t m,
                                typename Io<T>::acc_t slope) {
  constexpr int64_t es = sizeof(T);
  const int64_t* outer = strides + 3;
  if (strides[0] == es && strides[1] == es && strides[2] == es) {
    for (int64_t j = 0; j < m; ++j) {
      forward_row<A, T>(at_byte<const T>(data[1], j * outer[1]),
                        at_byte<const T>(data[2], j * outer[2]),
                        at_byte<T>(data[0], j * outer[0]), n, slope);
    }
  } else {
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t i = 0; i < n; ++i) {
        forward_row<A, T>(at_byte<const T>(data[1], j * outer[1] + i * strides[1]),
                          at_byte<const T>(data[2], j * outer[2] + i * strides[2]),
                          at_byte<T>(data[0], j * outer[0] + i * strides[0]), 1, slope);
      }
    }
  }
}

template <int A, typename T>
FI_INLINE void backward_loop_act(char** data, const int64_t* strides, int64_t n, int64_t m,
                                 typename Io<T>::acc_t slope) {
  constexpr int64_t es = sizeof(T);
  const int64_t* outer = strides + 5;
  if (strides[0] == es && strides[1] == es && strides[2] == es && strides[3] == es &&
      strides[4] == es) {
    for (int64_t j = 0; j < m; ++j) {
      backward_row<A, T>(at_byte<const T>(data[2], j * outer[2]),
                         at_byte<const T>(data[3], j * outer[3]),
                         at_byte<const T>(data[4], j * outer[4]),
                         at_byte<T>(data[0], j * outer[0]), at_byte<T>(data[1], j * outer[1]),
                         n, slope);
    }
  } else {
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t i = 0; i < n; ++i) {
        backward_row<A, T>(at_byte<const T>(data[2], j * outer[2] + i * strides[2]),
                           at_byte<const T>(data[3], j * outer[3] + i * strides[3]),
                           at_byte<const T>(data[4], j * outer[4] + i * strides[4]),
                           at_byte<T>(data[0], j * outer[0] + i * strides[0]),
                           at_byte<T>(data[1], j * outer[1] + i * strides[1]), 1, slope);
      }
    }
  }
}

template <typename T>
FI_INLINE void forward_loop(char** data, const int64_t* strides, int64_t n, int64_t m,
                            int64_t act, double slope) {
  using acc_t = typename Io<T>::acc_t;
  const acc_t s = static_cast<acc_t>(slope);
  switch (act) {
    case 1: forward_loop_act<1, T>(data, strides, n, m, s); break;
    case 2: forward_loop_act<2, T>(data, strides, n, m, s); break;
    case 3: forward_loop_act<3, T>(data, strides, n, m, s); break;
    default: forward_loop_act<0, T>(data, strides, n, m, s); break;
  }
}

template <typename T>
FI_INLINE void backward_loop(char** data, const int64_t* strides, int64_t n, int64_t m,
                             int64_t act, double slope) {
  using acc_t = typename Io<T>::acc_t;
  const acc_t s = static_cast<acc_t>(slope);
  switch (act) {
    case 1: backward_loop_act<1, T>(data, strides, n, m, s); break;
    case 2: backward_loop_act<2, T>(data, strides, n, m, s); break;
    case 3: backward_loop_act<3, T>(data, strides, n, m, s); break;
    default: backward_loop_act<0, T>(data, strides, n, m, s); break;
  }
}

// (data, strides, n, m, activation, negative_slope): one 2-D loop.
using LoopFn = void (*)(char**, const int64_t*, int64_t, int64_t, int64_t, double);

// One instantiation per instruction-set level. The bodies above are always_inline and
// carry no target attribute, so they are compiled with the caller's ISA.
template <typename T>
void forward_default(char** data, const int64_t* strides, int64_t n, int64_t m, int64_t act,
                     double slope) {
  forward_loop<T>(data, strides, n, m, act, slope);
}
template <typename T>
void backward_default(char** data, const int64_t* strides, int64_t n, int64_t m, int64_t act,
                      double slope) {
  backward_loop<T>(data, strides, n, m, act, slope);
}

#if FI_X86_MULTIVERSION

template <typename T>
FI_TARGET_V3 void forward_v3(char** data, const int64_t* strides, int64_t n, int64_t m,
                             int64_t act, double slope) {
  forward_loop<T>(data, strides, n, m, act, slope);
}
template <typename T>
FI_TARGET_V3 void backward_v3(char** data, const int64_t* strides, int64_t n, int64_t m,
                              int64_t act, double slope) {
  backward_loop<T>(data, strides, n, m, act, slope);
}
template <typename T>
FI_TARGET_V4 void forward_v4(char** data, const int64_t* strides, int64_t n, int64_t m,
                             int64_t act, double slope) {
  forward_loop<T>(data, strides, n, m, act, slope);
}
template <typename T>
FI_TARGET_V4 void backward_v4(char** data, const int64_t* strides, int64_t n, int64_t m,
                              int64_t act, double slope) {
  backward_loop<T>(data, strides, n, m, act, slope);
}
#endif  // FI_X86_MULTIVERSION

template <typename T>
LoopFn pick_forward() {
#if FI_X86_MULTIVERSION
  if constexpr (!std::is_same_v<T, double>) {
    return pick_by_isa(&forward_default<T>, &forward_v3<T>, &forward_v4<T>);
  }
#endif
  return &forward_default<T>;
}

template <typename T>
LoopFn pick_backward() {
#if FI_X86_MULTIVERSION
  if constexpr (!std::is_same_v<T, double>) {
    return pick_by_isa(&backward_default<T>, &backward_v3<T>, &backward_v4<T>);
  }
#endif
  return &backward_default<T>;
}

// Elements per parallel task: large enough to amortise the hand-off to another thread
// (~2 exp per element, well under a ns vectorised), small enough to split mid-sized maps.
constexpr int64_t kGrain = 32768;

// One operand of the (rows x inner) problem: element (r, i) of it is
// t[offset + r * row_stride + i], t contiguous.
struct RowOperand {
  const at::Tensor& t;
  int64_t row_stride;
  int64_t offset;
};

// Runs loop over the whole (rows x inner) problem, in chunks of at least kGrain elements on
// torch's threads (parallel_for, cpu/cpu_common.h). A chunk is a flat range of the
// problem: its partial first row, its whole rows (one call, row strides), its partial last
// row, so that each call of loop sees contiguous runs along inner. A problem of one chunk
// is one call over every row, on the calling thread.
template <typename Loop>
void run_rows(std::initializer_list<RowOperand> outputs,
              std::initializer_list<RowOperand> inputs, int64_t rows, int64_t inner,
              const Loop& loop) {
  constexpr size_t kMaxOperands = 5;
  const size_t ntensors = outputs.size() + inputs.size();
  TORCH_INTERNAL_ASSERT(ntensors <= kMaxOperands);
  char* base[kMaxOperands];
  int64_t strides[2 * kMaxOperands];  // TensorIterator's layout: inner strides, then row strides
  size_t k = 0;
  for (const auto* group : {&outputs, &inputs}) {
    for (const RowOperand& op : *group) {
      const int64_t es = op.t.element_size();
      base[k] = static_cast<char*>(op.t.data_ptr()) + op.offset * es;
      strides[k] = es;
      strides[ntensors + k] = op.row_stride * es;
      ++k;
    }
  }
  // loop over n elements of each of `count` rows, from element (r, i)
  auto call = [&](int64_t r, int64_t i, int64_t n, int64_t count) {
    char* data[kMaxOperands];
    for (size_t t = 0; t < ntensors; ++t) {
      data[t] = base[t] + r * strides[ntensors + t] + i * strides[t];
    }
    loop(data, strides, n, count);
  };
  parallel_for(0, rows * inner, kGrain, [&](int64_t begin, int64_t end) {
    int64_t r = begin / inner, i = begin - r * inner;
    if (i != 0) {  // the partial first row
      const int64_t n = std::min(inner - i, end - begin);
      call(r, i, n, 1);
      begin += n;
      ++r;
    }
    const int64_t whole = (end - begin) / inner;
    if (whole > 0) {
      call(r, 0, inner, whole);
      begin += whole * inner;
      r += whole;
    }
    if (begin < end) {  // the partial last row
      call(r, 0, end - begin, 1);
    }
  });
}

at::Tensor gated_conv_act_forward_cpu(const at::Tensor& pre, int64_t activation,
                                 double negative_slope) {
  GateOperands io = gate_forward_operands(pre, activation, c10::DeviceType::CPU);
  if (io.out.numel() == 0) {
    return io.out;
  }
  const GateLayout& layout = io.layout;
  const at::Tensor& p = io.pre;
  at::Tensor& out = io.out;

  const int64_t rows = layout.rows, inner = layout.inner;
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const LoopFn fn = pick_forward<T>();
    run_rows({{out, inner, 0}}, {{p, 2 * inner, 0}, {p, 2 * inner, inner}}, rows, inner,
             [&](char** data, const int64_t* strides, int64_t n, int64_t m) {
               fn(data, strides, n, m, activation, negative_slope);
             });
  });
  return out;
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols (transpose.h), by the
// element size: float32 in registers, the other types by the scalar loop.
template <typename T>
void transpose_tile(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t rows, int64_t cols) {
  if constexpr (std::is_same_v<T, float>) {
    static const transpose::F32Fn f32 = transpose::pick_f32();
    f32(src, src_stride, dst, dst_stride, 0, rows, 0, cols);
  } else {
    transpose::block<T>(src, src_stride, dst, dst_stride, 0, rows, 0, cols);
  }
}

// Positions per tile of the NCHW-writing forward: the tile's gated values (kTile x C) stay in
// L1 between the gating loop that writes them and the transposition that reads them.
constexpr int64_t kTile = 64;

// y (B, C, H, W) NCHW-contiguous from a channels-last pre (B, 2C, H, W). The layer's
// convolution ran channels-last (oneDNN's channels-last forward was up to 2.5x as fast as its
// NCHW one at DeepFill v2's first layers, benchmarks/conv_layouts.py) and its caller wants NCHW
// back: per tile of kTile positions of one image, the forward loop writes the tile's
// (positions x C) values into a buffer in L1, which is then written transposed into y's C
// planes (transpose.h), instead of gating channels-last and copying y to NCHW in a second pass.
at::Tensor gated_conv_act_forward_nchw_cpu(const at::Tensor& pre, int64_t activation, double negative_slope) {
  check_gate_forward(pre, activation, c10::DeviceType::CPU);
  const at::Tensor p = pre.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t B = p.size(0), C = p.size(1) / 2, HW = p.size(2) * p.size(3);
  at::Tensor out = at::empty({B, C, p.size(2), p.size(3)}, p.options());
  if (out.numel() == 0) {
    return out;
  }
  const int64_t tiles = (HW + kTile - 1) / kTile;
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const LoopFn fn = pick_forward<T>();
    constexpr int64_t es = sizeof(T);
    const T* pp = p.data_ptr<T>();
    T* yp = out.data_ptr<T>();
    // operands y (the tile buffer), f, g: inner stride one element; rows: a position each
    const int64_t strides[6] = {es, es, es, C * es, 2 * C * es, 2 * C * es};
    parallel_for(0, B * tiles, std::max<int64_t>(1, kGrain / (kTile * C)), [&](int64_t t0, int64_t t1) {
      std::vector<T> buf(kTile * C);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / tiles, q0 = (t % tiles) * kTile, n = std::min(kTile, HW - q0);
        const T* rows = pp + (b * HW + q0) * 2 * C;
        char* data[3] = {reinterpret_cast<char*>(buf.data()), reinterpret_cast<char*>(const_cast<T*>(rows)),
                         reinterpret_cast<char*>(const_cast<T*>(rows + C))};
        fn(data, strides, C, n, activation, negative_slope);
        transpose_tile(buf.data(), C, yp + b * C * HW + q0, HW, n, C);
      }
    });
  });
  return out;
}

at::Tensor gated_conv_act_backward_cpu(const at::Tensor& grad_out, const at::Tensor& pre,
                                  int64_t activation, double negative_slope) {
  GateOperands io = gate_backward_operands(grad_out, pre, activation, c10::DeviceType::CPU);
  if (io.out.numel() == 0) {
    return io.out;
  }
  const GateLayout& layout = io.layout;
  const at::Tensor& p = io.pre;
  const at::Tensor& dy = io.grad_out;
  at::Tensor& dpre = io.out;

  const int64_t rows = layout.rows, inner = layout.inner;
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const LoopFn fn = pick_backward<T>();
    run_rows({{dpre, 2 * inner, 0}, {dpre, 2 * inner, inner}},
             {{dy, inner, 0}, {p, 2 * inner, 0}, {p, 2 * inner, inner}}, rows, inner,
             [&](char** data, const int64_t* strides, int64_t n, int64_t m) {
               fn(data, strides, n, m, activation, negative_slope);
             });
  });
  return dpre;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) {
  m.impl("gated_conv_act_forward", &gated_conv_act_forward_cpu);
  m.impl("gated_conv_act_backward", &gated_conv_act_backward_cpu);
  m.impl("gated_conv_act_forward_nchw", &gated_conv_act_forward_nchw_cpu);
}

}  // namespace fastinpaint

// CPU kernels of the self-similarity maps and the fused spatially-correlative distance
// (F-LSeSim). Math: fastinpaint/ops/self_similarity/reference.py; geometry and checks:
// csrc/self_similarity.h.
//
//   self_similarity_forward     g (B,H,W,C) -> S (B,Q,N): one task per block of query rows,
//                               one dot product of C contiguous values per entry.
//   self_similarity_backward    dS (B,Q,N) -> dg (B,H,W,C): one task per (batch, block of
//                               channels), so the scatter into the keys' positions never
//                               conflicts between tasks (deterministic, no atomics).
//   spatial_correlative_distance_forward
//                               both maps' rows computed in a per-thread buffer (never
//                               written to memory), the top-quarter threshold of the target
//                               row by nth_element, then the row's l1 sum or 1 - cosine.
//   spatial_correlative_distance_backward
//                               rows recomputed, the per-entry gradient of the distance
//                               written to a (B,Q,N) float buffer per map, then the maps'
//                               backward scatter.
//
// Parallel loops: parallel_for (cpu/cpu_common.h), on torch's intra-op threads.
#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"
#include "self_similarity.h"

namespace fastinpaint {
namespace {

using selfsim::Geometry;

// Runs fn(task) for every task in [0, n), one task per chunk of parallel_for.
template <typename Fn>
void parallel_tasks(int64_t n, const Fn& fn) {
  parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      fn(t);
    }
  });
}

// <a, b> over n contiguous values, in acc_t, with 8 independent partial sums (vectorisable).
template <typename T, typename acc_t>
FI_INLINE acc_t dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int u = 0; u < 8; ++u) {
      s[u] += static_cast<acc_t>(a[i + u]) * static_cast<acc_t>(b[i + u]);
    }
  }
  acc_t r = 0;
  for (; i < n; ++i) {
    r += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + r;
}

// <q, k + m*C> for m = 0..3 (four consecutive positions): the query's loads shared.
template <typename T, typename acc_t>
FI_INLINE void dot4(const T* __restrict__ q, const T* __restrict__ k, int64_t C, acc_t* out) {
  acc_t s0[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s1[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  acc_t s2[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s3[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const T* k1 = k + C;
  const T* k2 = k + 2 * C;
  const T* k3 = k + 3 * C;
  int64_t i = 0;
  for (; i + 8 <= C; i += 8) {
    for (int u = 0; u < 8; ++u) {
      const acc_t qv = static_cast<acc_t>(q[i + u]);
      s0[u] += qv * static_cast<acc_t>(k[i + u]);
      s1[u] += qv * static_cast<acc_t>(k1[i + u]);
      s2[u] += qv * static_cast<acc_t>(k2[i + u]);
      s3[u] += qv * static_cast<acc_t>(k3[i + u]);
    }
  }
  acc_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (; i < C; ++i) {
    const acc_t qv = static_cast<acc_t>(q[i]);
    t0 += qv * static_cast<acc_t>(k[i]);
    t1 += qv * static_cast<acc_t>(k1[i]);
    t2 += qv * static_cast<acc_t>(k2[i]);
    t3 += qv * static_cast<acc_t>(k3[i]);
  }
  auto red = [](const acc_t* v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); };
  out[0] = red(s0) + t0;
  out[1] = red(s1) + t1;
  out[2] = red(s2) + t2;
  out[3] = red(s3) + t3;
}

// One row of raw similarities: out[j] = <g[query], g[window entry j]> (0 outside the map),
// tanh(./10) when squash.
template <typename T, typename acc_t>
FI_INLINE void similarity_row_body(const T* gb, int64_t C, const Geometry& geo, int64_t p, bool squash, acc_t* out) {
  const T* gq = gb + p * C;
  int64_t r0, c0;
  geo.start(p, r0, c0);
  for (int64_t i = 0; i < geo.kh; ++i) {
    const int64_t r = r0 + i;
    acc_t* o = out + i * geo.kw;
    std::fill(o, o + geo.kw, acc_t(0));
    if (r < 0 || r >= geo.H) {
      continue;
    }
    // the window row's positions inside the map: k in [k_lo, k_hi), contiguous in memory
    const int64_t k_lo = std::max<int64_t>(0, -c0), k_hi = std::min<int64_t>(geo.kw, geo.W - c0);
    const int64_t row_pos = r * geo.W + c0;  // + k: the position of entry k (k >= k_lo >= -c0)
    int64_t k = k_lo;
    for (; k + 4 <= k_hi; k += 4) {
      dot4<T, acc_t>(gq, gb + (row_pos + k) * C, C, o + k);
    }
    for (; k < k_hi; ++k) {
      o[k] = dot<T, acc_t>(gq, gb + (row_pos + k) * C, C);
    }
    if (squash) {
      for (int64_t kk = k_lo; kk < k_hi; ++kk) {
        o[kk] = std::tanh(o[kk] / acc_t(selfsim::kTanhScale));
      }
    }
  }
}

// ---- float32 rows from a channel-major copy of the features
//
// In the kernels' layout (B, H, W, C) an entry is a dot product over C contiguous values:
// vectorised over channels, each entry ends in a horizontal sum, and a window row of kw
// entries is kw of them. From a channel-major copy gc (B, C, H, W), a window row is kw
// contiguous values per channel, so the row is a sum over channels of q[c] times a
// contiguous vector: vectorised over the row's positions, one broadcast and one load per
// multiply-add and no horizontal sums. The copy is padded by kCmPad values: a row's last
// vector may read past its end (into the next row, the channel's padding or the end's), and
// those lanes are not stored.
constexpr int64_t kCmPad = 64;

// The copy's distance between channels: H*W rounded up to whole cache lines, plus one line,
// so that it is never a multiple of 4 KiB (a 64x64 map's 16 KiB stride put every channel of
// a position in one L1 set).
inline int64_t cm_channel_stride(int64_t HW) { return (HW + 15) / 16 * 16 + 16; }

// out[k] = sum_c q[c] * base[c * HW + k] for k in [0, n); L floats per vector, two vectors
// of positions at a time, four channel phases (independent accumulators).
template <int L>
FI_INLINE void row_cm_body(const float* __restrict__ q, const float* __restrict__ base, int64_t HW, int64_t C,
                           int64_t n, float* __restrict__ out) {
  using vf = typename Vec<L>::f;
  using vfu = typename Vec<L>::fu;
  for (int64_t k = 0; k < n; k += 2 * L) {
    vf a0[4] = {}, a1[4] = {};
    const float* p = base + k;
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) {
      for (int u = 0; u < 4; ++u) {
        const float* pc = p + (c + u) * HW;
        const vf w = vf{} + q[c + u];
        a0[u] += w * *reinterpret_cast<const vfu*>(pc);
        a1[u] += w * *reinterpret_cast<const vfu*>(pc + L);
      }
    }
    for (; c < C; ++c) {
      const float* pc = p + c * HW;
      const vf w = vf{} + q[c];
      a0[0] += w * *reinterpret_cast<const vfu*>(pc);
      a1[0] += w * *reinterpret_cast<const vfu*>(pc + L);
    }
    const vf r0 = (a0[0] + a0[1]) + (a0[2] + a0[3]), r1 = (a1[0] + a1[1]) + (a1[2] + a1[3]);
    float tmp[2 * L];
    std::memcpy(tmp, &r0, sizeof(r0));
    std::memcpy(tmp + L, &r1, sizeof(r1));
    const int64_t m = std::min<int64_t>(2 * L, n - k);
    for (int64_t j = 0; j < m; ++j) {
      out[k + j] = tmp[j];
    }
  }
}

// similarity_row_body's row from the channel-major copy: gcb the sample's (C, cs) copy.
template <int L>
FI_INLINE void similarity_row_cm_body(const float* gcb, int64_t C, int64_t cs, const Geometry& geo, int64_t p,
                                      bool squash, float* out) {
  thread_local std::vector<float> query;  // the query's C values, gathered from the copy once
  query.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    query[c] = gcb[c * cs + p];
  }
  const float* gq = query.data();
  int64_t r0, c0;
  geo.start(p, r0, c0);
  for (int64_t i = 0; i < geo.kh; ++i) {
    const int64_t r = r0 + i;
    float* o = out + i * geo.kw;
    if (r < 0 || r >= geo.H) {
      std::fill(o, o + geo.kw, 0.0f);
      continue;
    }
    const int64_t k_lo = std::max<int64_t>(0, -c0), k_hi = std::min<int64_t>(geo.kw, geo.W - c0);
    std::fill(o, o + k_lo, 0.0f);
    std::fill(o + std::max(k_lo, k_hi), o + geo.kw, 0.0f);
    if (k_hi > k_lo) {
      row_cm_body<L>(gq, gcb + r * geo.W + c0 + k_lo, cs, C, k_hi - k_lo, o + k_lo);
    }
    if (squash) {
      for (int64_t kk = k_lo; kk < k_hi; ++kk) {
        o[kk] = std::tanh(o[kk] / float(selfsim::kTanhScale));
      }
    }
  }
}

using RowCmFn = void (*)(const float*, int64_t, int64_t, const Geometry&, int64_t, bool, float*);

void similarity_row_cm_default(const float* gcb, int64_t C, int64_t cs, const Geometry& geo, int64_t p, bool squash,
                               float* out) {
  similarity_row_cm_body<4>(gcb, C, cs, geo, p, squash, out);
}
#if FI_X86_MULTIVERSION
FI_TARGET_V3 void similarity_row_cm_v3(const float* gcb, int64_t C, int64_t cs, const Geometry& geo,
                                       int64_t p, bool squash, float* out) {
  similarity_row_cm_body<8>(gcb, C, cs, geo, p, squash, out);
}
FI_TARGET_V4 void similarity_row_cm_v4(const float* gcb, int64_t C, int64_t cs, const Geometry& geo,
                                       int64_t p, bool squash, float* out) {
  similarity_row_cm_body<16>(gcb, C, cs, geo, p, squash, out);
}
#endif

void check_index_values(const at::Tensor& index, int64_t HW) {
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < HW, "fastinpaint: query_index must lie in [0, H*W) = [0, ", HW,
                "), got ", ip[i], " at position ", i);
  }
}

// The queries in the order of their positions (row-major; stable): consecutive rows of a
// task then read overlapping windows, which stay in cache (random queries otherwise fetch
// each window from memory again). Each row's result still goes to its own place.
std::vector<int64_t> spatial_order(const int64_t* ip, int64_t Q) {
  std::vector<int64_t> order(Q);
  for (int64_t q = 0; q < Q; ++q) {
    order[q] = q;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ip[a] < ip[b]; });
  return order;
}

// Rows per task: about 64 K dot products each.
int64_t rows_per_task(int64_t N, int64_t C) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, N * std::max<int64_t>(C, 8) / 8));
}

// ak += w * gq and aq += w * gk over n values (separate, non-aliasing buffers: vectorised).
template <typename T, typename acc_t>
FI_INLINE void dual_axpy(acc_t* __restrict__ ak, acc_t* __restrict__ aq, const acc_t* __restrict__ gq,
                      const T* __restrict__ gk, acc_t w, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    ak[c] += w * gq[c];
    aq[c] += w * static_cast<acc_t>(gk[c]);
  }
}

// dg[b] from the coefficients G (B, Q, N) in acc_t: for every query q and window entry j at
// position k, dg[q's position] += G[q,j] g[k] and dg[k] += G[q,j] g[q's position].
// One task per (batch, block of channels): disjoint outputs, fixed order.
// One scatter task: batch b, channels [c_lo, c_lo + n), accumulated into acc (HW x n).
template <typename T, typename acc_t>
FI_INLINE void scatter_task_body(const acc_t* G, const T* gp, const int64_t* ip, int64_t Q, int64_t C,
                                 const Geometry& geo, int64_t b, int64_t c_lo, int64_t n, acc_t* acc) {
  const int64_t HW = geo.H * geo.W, N = geo.entries();
  std::vector<acc_t> gq(n), aq(n);
    const T* gb = gp + b * HW * C + c_lo;
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t p = ip[q];
      const acc_t* Gr = G + (b * Q + q) * N;
      for (int64_t c = 0; c < n; ++c) {
        gq[c] = static_cast<acc_t>(gb[p * C + c]);
        aq[c] = 0;
      }
      int64_t r0, c0;
      geo.start(p, r0, c0);
      for (int64_t i = 0; i < geo.kh; ++i) {
        const int64_t r = r0 + i;
        if (r < 0 || r >= geo.H) {
          continue;
        }
        for (int64_t k = 0; k < geo.kw; ++k) {
          const int64_t col = c0 + k;
          if (col < 0 || col >= geo.W) {
            continue;
          }
          const acc_t w = Gr[i * geo.kw + k];
          if (w == acc_t(0)) {
            continue;
          }
          const int64_t kp = r * geo.W + col;
          dual_axpy<T, acc_t>(acc + kp * n, aq.data(), gq.data(), gb + kp * C, w, n);
        }
      }
      acc_t* ap = acc + p * n;
      for (int64_t c = 0; c < n; ++c) {
        ap[c] += aq[c];
      }
    }
}

template <typename T, typename acc_t>
using ScatterFn = void (*)(const acc_t*, const T*, const int64_t*, int64_t, int64_t, const Geometry&, int64_t,
                           int64_t, int64_t, acc_t*);
template <typename T, typename acc_t>
using RowFn = void (*)(const T*, int64_t, const Geometry&, int64_t, bool, acc_t*);

template <typename T, typename acc_t>
void scatter_task_default(const acc_t* G, const T* gp, const int64_t* ip, int64_t Q, int64_t C, const Geometry& geo,
                          int64_t b, int64_t c_lo, int64_t n, acc_t* acc) {
  scatter_task_body<T, acc_t>(G, gp, ip, Q, C, geo, b, c_lo, n, acc);
}
template <typename T, typename acc_t>
void similarity_row_default(const T* gb, int64_t C, const Geometry& geo, int64_t p, bool squash, acc_t* out) {
  similarity_row_body<T, acc_t>(gb, C, geo, p, squash, out);
}

// The hot loops compiled again for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512); the best one
// the CPU supports, capped by torch's own CPU capability (ATEN_CPU_CAPABILITY), runs.
#if FI_X86_MULTIVERSION
template <typename T, typename acc_t>
FI_TARGET_V3 void scatter_task_v3(const acc_t* G, const T* gp, const int64_t* ip, int64_t Q, int64_t C,
                                   const Geometry& geo, int64_t b, int64_t c_lo, int64_t n, acc_t* acc) {
  scatter_task_body<T, acc_t>(G, gp, ip, Q, C, geo, b, c_lo, n, acc);
}
template <typename T, typename acc_t>
FI_TARGET_V4 void scatter_task_v4(const acc_t* G, const T* gp, const int64_t* ip, int64_t Q, int64_t C,
                                   const Geometry& geo, int64_t b, int64_t c_lo, int64_t n, acc_t* acc) {
  scatter_task_body<T, acc_t>(G, gp, ip, Q, C, geo, b, c_lo, n, acc);
}
template <typename T, typename acc_t>
FI_TARGET_V3 void similarity_row_v3(const T* gb, int64_t C, const Geometry& geo, int64_t p, bool squash,
                                     acc_t* out) {
  similarity_row_body<T, acc_t>(gb, C, geo, p, squash, out);
}
template <typename T, typename acc_t>
FI_TARGET_V4 void similarity_row_v4(const T* gb, int64_t C, const Geometry& geo, int64_t p, bool squash,
                                     acc_t* out) {
  similarity_row_body<T, acc_t>(gb, C, geo, p, squash, out);
}
#endif  // FI_X86_MULTIVERSION

template <typename T, typename acc_t>
ScatterFn<T, acc_t> pick_scatter() {
#if FI_X86_MULTIVERSION
  if constexpr (!std::is_same_v<T, double>) {
    return pick_by_isa(&scatter_task_default<T, acc_t>, &scatter_task_v3<T, acc_t>, &scatter_task_v4<T, acc_t>);
  }
#endif
  return &scatter_task_default<T, acc_t>;
}

template <typename T, typename acc_t>
RowFn<T, acc_t> pick_row() {
#if FI_X86_MULTIVERSION
  if constexpr (!std::is_same_v<T, double>) {
    return pick_by_isa(&similarity_row_default<T, acc_t>, &similarity_row_v3<T, acc_t>, &similarity_row_v4<T, acc_t>);
  }
#endif
  return &similarity_row_default<T, acc_t>;
}

// dst[(b * C + c) * cs + p] = g[(b * HW + p) * C + c]: 16 x 16 tiles (reads and writes by
// whole cache lines), in parallel over (sample, block of 16 channels). ATen's strided copy
// of the permuted tensor took 4x as long (a 2 x 64 x 64 x 128 map: 1.7 ms).
void to_channel_major(const float* g, float* dst, int64_t B, int64_t HW, int64_t C, int64_t cs) {
  const int64_t cb = (C + 15) / 16;
  parallel_tasks(B * cb, [&](int64_t t) {
    const int64_t b = t / cb, c_lo = (t % cb) * 16, nc = std::min<int64_t>(16, C - c_lo);
    const float* src = g + b * HW * C + c_lo;
    float* out = dst + (b * C + c_lo) * cs;
    for (int64_t c = 0; c < nc; ++c) {
      std::fill(out + c * cs + HW, out + (c + 1) * cs, 0.0f);
    }
    for (int64_t p0 = 0; p0 < HW; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, HW - p0);
      for (int64_t c = 0; c < nc; ++c) {
        for (int64_t p = 0; p < np; ++p) {
          out[c * cs + p0 + p] = src[(p0 + p) * C + c];
        }
      }
    }
  });
}

// Whether g (B, H, W, C) is a permuted view of a contiguous (B, C, H, W) tensor (what the
// CPU backend's normalisation gives NCHW features): the kernels then read it as it is, and
// return gradients in the same layout (no transposition either way).
bool channel_major(const at::Tensor& g) { return !g.is_contiguous() && g.permute({0, 3, 1, 2}).is_contiguous(); }

// The rows of one call's features g (B, H, W, C), and what the backward scatter reads: float32
// windows at least kCmMinWidth wide from a channel-major copy (above), everything else from
// g in (B, H, W, C) order (a contiguous copy where g is not). The scatter by positions wants
// windows at least kCmScatterMinWidth wide: below, the channel-vectorised loop, which also
// skips the zero coefficients, is faster (measured, a dense 15 x 15 window, C = 64,
// 2 x 64 x 64, forward + backward: 60 against 24 ms).
constexpr int64_t kCmMinWidth = 8;
constexpr int64_t kCmScatterMinWidth = 16;

template <typename T, typename acc_t>
struct Rows {
  int64_t HW, C;
  const Geometry& geo;
  RowFn<T, acc_t> by_channel = pick_row<T, acc_t>();
  RowCmFn by_position = nullptr;
  bool scatter_by_position = false;
  at::Tensor bhwc;       // g, (B, H, W, C) contiguous: where something reads it so
  const T* g = nullptr;
  at::Tensor gc;         // (B, C, cs): each channel's H x W map, then padding
  const float* gcp = nullptr;
  int64_t cs = 0;

  Rows(const at::Tensor& g_, const Geometry& geo_) : HW(g_.size(1) * g_.size(2)), C(g_.size(3)), geo(geo_) {
    const int64_t B = g_.size(0);
    if constexpr (std::is_same_v<T, float>) {
      if (geo.kw >= kCmMinWidth) {
        by_position = FI_PICK_ISA(similarity_row_cm);
        scatter_by_position = geo.kw >= kCmScatterMinWidth;
        cs = cm_channel_stride(HW);
        gc = at::empty({B * C * cs + kCmPad}, g_.options());
        gcp = gc.data_ptr<float>();
        float* dst = gc.data_ptr<float>();
        // the padding read past a row's end is zeroed (its lanes are never stored)
        std::fill(dst + B * C * cs, dst + B * C * cs + kCmPad, 0.0f);
        if (channel_major(g_)) {  // channel by channel into the padded rows
          const float* src = g_.data_ptr<float>();
          parallel_tasks(B * C, [&](int64_t t) {
            std::memcpy(dst + t * cs, src + t * HW, HW * sizeof(float));
            std::fill(dst + t * cs + HW, dst + (t + 1) * cs, 0.0f);
          });
        } else {
          bhwc = g_.contiguous();
          to_channel_major(bhwc.data_ptr<float>(), gc.data_ptr<float>(), B, HW, C, cs);
        }
      }
    }
    if (by_position == nullptr || !scatter_by_position) {
      if (!bhwc.defined()) bhwc = g_.contiguous();
      g = bhwc.data_ptr<T>();
    }
  }

  // the row of query position p in sample b
  void operator()(int64_t b, int64_t p, bool squash, acc_t* out) const {
    if constexpr (std::is_same_v<T, float>) {
      if (by_position != nullptr) {
        by_position(gcp + b * C * cs, C, cs, geo, p, squash, out);
        return;
      }
    }
    by_channel(g + b * HW * C, C, geo, p, squash, out);
  }
};

// A gradient in g's layout: channel-major (a permuted (B, C, H, W) tensor) where g is.
at::Tensor new_gradient(const at::Tensor& g) {
  if (channel_major(g)) {
    return new_output({g.size(0), g.size(3), g.size(1), g.size(2)}, g.options(), at::MemoryFormat::Contiguous)
        .permute({0, 2, 3, 1});
  }
  return new_output(g.sizes(), g.options(), at::MemoryFormat::Contiguous);
}

// ---- float32 backward scatter from the channel-major copy
//
// One task: sample b, channels [c_lo, c_lo + n), every query, into acc (n, cs)
// channel-major. Per query and channel, each window row is a contiguous run:
// acc[c, window] += G_row * g[p, c] (an axpy over positions) and acc[c, p] += <G_row,
// gc[c, window]> (one vector accumulator, summed once per channel), vectorised over the
// row's positions as the forward rows are.
template <int L>
FI_INLINE void scatter_cm_task_body(const float* G, const float* gc, const int64_t* ip, const int64_t* order,
                                    int64_t Q, int64_t C, int64_t cs, const Geometry& geo, int64_t b, int64_t c_lo,
                                    int64_t n, float* acc) {
  using vf = typename Vec<L>::f;
  using vfu = typename Vec<L>::fu;
  const int64_t N = geo.entries();
  // each query's window inside the map, found once: rows [i_lo, i_hi), columns [k_lo, k_hi)
  struct Window {
    int64_t q, p, r0, c0, i_lo, i_hi, k_lo, k_hi;
  };
  std::vector<Window> windows;
  windows.reserve(Q);
  for (int64_t qq = 0; qq < Q; ++qq) {
    Window w;
    w.q = order[qq];
    w.p = ip[w.q];
    geo.start(w.p, w.r0, w.c0);
    w.i_lo = std::max<int64_t>(0, -w.r0);
    w.i_hi = std::min<int64_t>(geo.kh, geo.H - w.r0);
    w.k_lo = std::max<int64_t>(0, -w.c0);
    w.k_hi = std::min<int64_t>(geo.kw, geo.W - w.c0);
    if (w.i_hi > w.i_lo && w.k_hi > w.k_lo) {
      windows.push_back(w);
    }
  }
  // channel by channel: its map of g and of acc (2 x H x W values) stay in L1 across all
  // the queries, and only G streams (from L2: the task's G is Q x N values)
  for (int64_t c = 0; c < n; ++c) {
    const float* gch = gc + (b * C + c_lo + c) * cs;
    float* ach = acc + c * cs;
    for (const Window& win : windows) {
      const float* Gr = G + (b * Q + win.q) * N;
      const float gp = gch[win.p];
      const vf w = vf{} + gp;
      vf dq = {};
      float dq_tail = 0.0f;
      for (int64_t i = win.i_lo; i < win.i_hi; ++i) {
        const float* Grow = Gr + i * geo.kw;
        const int64_t off = (win.r0 + i) * geo.W + win.c0;
        int64_t k = win.k_lo;
        for (; k + L <= win.k_hi; k += L) {
          const vf gv = *reinterpret_cast<const vfu*>(Grow + k);
          dq += gv * *reinterpret_cast<const vfu*>(gch + off + k);
          vfu* a = reinterpret_cast<vfu*>(ach + off + k);
          *a = *a + gv * w;
        }
        for (; k < win.k_hi; ++k) {
          dq_tail += Grow[k] * gch[off + k];
          ach[off + k] += Grow[k] * gp;
        }
      }
      float total = dq_tail;
      for (int l = 0; l < L; ++l) {
        total += dq[l];
      }
      ach[win.p] += total;
    }
  }
}

using ScatterCmFn = void (*)(const float*, const float*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
                             const Geometry&, int64_t, int64_t, int64_t, float*);
void scatter_cm_task_default(const float* G, const float* gc, const int64_t* ip, const int64_t* order, int64_t Q,
                             int64_t C, int64_t cs, const Geometry& geo, int64_t b, int64_t c_lo, int64_t n,
                             float* acc) {
  scatter_cm_task_body<4>(G, gc, ip, order, Q, C, cs, geo, b, c_lo, n, acc);
}
#if FI_X86_MULTIVERSION
FI_TARGET_V3 void scatter_cm_task_v3(const float* G, const float* gc, const int64_t* ip, const int64_t* order,
                                     int64_t Q, int64_t C, int64_t cs, const Geometry& geo, int64_t b, int64_t c_lo,
                                     int64_t n, float* acc) {
  scatter_cm_task_body<8>(G, gc, ip, order, Q, C, cs, geo, b, c_lo, n, acc);
}
FI_TARGET_V4 void scatter_cm_task_v4(const float* G, const float* gc, const int64_t* ip, const int64_t* order,
                                     int64_t Q, int64_t C, int64_t cs, const Geometry& geo, int64_t b, int64_t c_lo,
                                     int64_t n, float* acc) {
  scatter_cm_task_body<16>(G, gc, ip, order, Q, C, cs, geo, b, c_lo, n, acc);
}
#endif

// dg (B, H, W, C; contiguous or channel-major, new_gradient) from the coefficients G (B, Q, N):
// one task per (sample, block of channels), so the scatter never conflicts between tasks
// (deterministic, no atomics).
template <typename T, typename acc_t>
void scatter_backward(const acc_t* G, const Rows<T, acc_t>& rows, at::Tensor& dg, const int64_t* ip,
                      const std::vector<int64_t>& order, int64_t B, int64_t Q, int64_t C, const Geometry& geo) {
  const int64_t HW = geo.H * geo.W;
  T* dgp = dg.data_ptr<T>();
  const int64_t s_pos = dg.stride(2), s_ch = dg.stride(3);  // (C, 1) or (1, H*W)
  // channel blocks of 8..64, enough of them for every thread (two tasks each)
  const int64_t want = std::max<int64_t>(1, 2 * at::get_num_threads());
  int64_t cw = (C * B + want - 1) / want;
  cw = std::min<int64_t>(64, std::max<int64_t>(8, (cw + 7) / 8 * 8));
  cw = std::min<int64_t>(cw, C);
  const int64_t nblk = (C + cw - 1) / cw;
  if constexpr (std::is_same_v<T, float>) {
    if (rows.scatter_by_position) {
      const ScatterCmFn task = FI_PICK_ISA(scatter_cm_task);
      const int64_t cs = rows.cs;
      parallel_tasks(B * nblk, [&](int64_t t) {
        const int64_t b = t / nblk, c_lo = (t % nblk) * cw, n = std::min(cw, C - c_lo);
        std::vector<float> acc(n * cs, 0.0f);
        task(G, rows.gcp, ip, order.data(), Q, C, cs, geo, b, c_lo, n, acc.data());
        float* db = dgp + b * HW * C + c_lo * s_ch;
        if (s_pos == 1) {  // channel-major: a channel's map is one run
          for (int64_t c = 0; c < n; ++c) {
            std::memcpy(db + c * s_ch, acc.data() + c * cs, HW * sizeof(float));
          }
          return;
        }
        for (int64_t pos = 0; pos < HW; ++pos) {  // to (H, W, C)
          for (int64_t c = 0; c < n; ++c) {
            db[pos * s_pos + c * s_ch] = acc[c * cs + pos];
          }
        }
      });
      return;
    }
  }
  const ScatterFn<T, acc_t> task = pick_scatter<T, acc_t>();
  parallel_tasks(B * nblk, [&](int64_t t) {
    const int64_t b = t / nblk, c_lo = (t % nblk) * cw, n = std::min(cw, C - c_lo);
    std::vector<acc_t> acc(HW * n, acc_t(0));
    task(G, rows.g, ip, Q, C, geo, b, c_lo, n, acc.data());
    T* db = dgp + b * HW * C + c_lo * s_ch;
    for (int64_t pos = 0; pos < HW; ++pos) {
      for (int64_t c = 0; c < n; ++c) {
        db[pos * s_pos + c * s_ch] = static_cast<T>(acc[pos * n + c]);
      }
    }
  });
}

at::Tensor self_similarity_forward_cpu(const at::Tensor& g_, const at::Tensor& index_, int64_t patch_size,
                                       int64_t window, bool squash) {
  selfsim::check_features(g_, "g", c10::DeviceType::CPU);
  selfsim::check_index(index_, g_);
  const at::Tensor& g = g_;  // any layout: Rows reads it
  const at::Tensor index = index_.contiguous();
  const int64_t B = g.size(0), H = g.size(1), W = g.size(2), C = g.size(3), Q = index.numel();
  const Geometry geo = selfsim::make_geometry(H, W, patch_size, window);
  check_index_values(index, H * W);
  const int64_t N = geo.entries();
  at::Tensor out = new_output({B, Q, N}, g.options(), at::MemoryFormat::Contiguous);
  if (out.numel() == 0) {
    return out;
  }
  const int64_t* ip = index.data_ptr<int64_t>();
  const std::vector<int64_t> order = spatial_order(ip, Q);
  dispatch_dtype(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    T* op = out.data_ptr<T>();
    const int64_t per = rows_per_task(N, C);
    const int64_t tasks = (B * Q + per - 1) / per;
    const Rows<T, acc_t> rows(g, geo);
    parallel_tasks(tasks, [&](int64_t t) {
      std::vector<acc_t> buf(N);
      for (int64_t rq = t * per; rq < std::min(B * Q, (t + 1) * per); ++rq) {
        const int64_t b = rq / Q, q = order[rq % Q], row = b * Q + q;
        rows(b, ip[q], squash, buf.data());
        T* o = op + row * N;
        for (int64_t j = 0; j < N; ++j) {
          o[j] = static_cast<T>(buf[j]);
        }
      }
    });
  });
  return out;
}

at::Tensor self_similarity_backward_cpu(const at::Tensor& grad_, const at::Tensor& g_, const at::Tensor& index_,
                                        int64_t patch_size, int64_t window) {
  selfsim::check_features(g_, "g", c10::DeviceType::CPU);
  selfsim::check_index(index_, g_);
  const at::Tensor& g = g_;  // any layout: Rows reads it
  const at::Tensor index = index_.contiguous();
  const int64_t B = g.size(0), H = g.size(1), W = g.size(2), C = g.size(3), Q = index.numel();
  const Geometry geo = selfsim::make_geometry(H, W, patch_size, window);
  check_index_values(index, H * W);
  TORCH_CHECK(grad_.dim() == 3 && grad_.size(0) == B && grad_.size(1) == Q && grad_.size(2) == geo.entries(),
              "fastinpaint: grad must have shape (B, Q, N) = (", B, ", ", Q, ", ", geo.entries(), "), got ",
              grad_.sizes());
  TORCH_CHECK(grad_.device() == g.device(), "fastinpaint: grad must be on ", g.device());
  const at::Tensor G = grad_.to(selfsim::acc_type(g.scalar_type())).contiguous();
  at::Tensor dg = new_gradient(g);
  if (dg.numel() == 0) {
    return dg;
  }
  const int64_t* ip = index.data_ptr<int64_t>();
  const std::vector<int64_t> order = spatial_order(ip, Q);
  dispatch_dtype(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    const Rows<T, acc_t> rows(g, geo);
    scatter_backward<T, acc_t>(G.data_ptr<acc_t>(), rows, dg, ip, order, B, Q, C, geo);
  });
  return dg;
}

// The threshold of a target row: its value at 0-based index num of the descending sort.
// float: the largest order-preserving key k (the float's bits, sign-flipped) with at least
// num + 1 keys >= k, found bit by bit: 32 counting passes, vectorised (L lanes), without
// the branches of a selection.
// Any key k built so is some entry's key, so the result is that entry's value.
FI_INLINE uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <int L>
FI_INLINE float top_threshold_body(const float* t, int64_t N, int64_t num, std::vector<uint32_t>& keys) {
  using vuu = typename Vec<L>::uu;
  using vi = typename Vec<L>::i;
  const int64_t Np = (N + L - 1) / L * L;
  keys.assign(Np, 0u);  // padding keys 0: never >= a candidate (candidates have a bit set)
  for (int64_t j = 0; j < N; ++j) {
    keys[j] = order_key(t[j]);
  }
  const vuu* kv = reinterpret_cast<const vuu*>(keys.data());
  uint32_t k = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = k | (1u << bit);
    vi cnt = {};
    for (int64_t v = 0; v < Np / L; ++v) {
      cnt -= reinterpret_cast<vi>(kv[v] >= cand);  // true lanes are -1
    }
    int64_t total = 0;
    for (int l = 0; l < L; ++l) {
      total += cnt[l];
    }
    if (total >= num + 1) {
      k = cand;
    }
  }
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

using ThresholdFn = float (*)(const float*, int64_t, int64_t, std::vector<uint32_t>&);
float top_threshold_default(const float* t, int64_t N, int64_t num, std::vector<uint32_t>& keys) {
  return top_threshold_body<4>(t, N, num, keys);
}
#if FI_X86_MULTIVERSION
FI_TARGET_V3 float top_threshold_v3(const float* t, int64_t N, int64_t num, std::vector<uint32_t>& keys) {
  return top_threshold_body<8>(t, N, num, keys);
}
FI_TARGET_V4 float top_threshold_v4(const float* t, int64_t N, int64_t num, std::vector<uint32_t>& keys) {
  return top_threshold_body<16>(t, N, num, keys);
}
#endif

// double: a selection.
double top_threshold(const double* t, int64_t N, int64_t num, std::vector<double>& scratch) {
  scratch.assign(t, t + N);
  std::nth_element(scratch.begin(), scratch.begin() + num, scratch.end(), std::greater<double>());
  return scratch[num];
}

std::tuple<at::Tensor, at::Tensor> distance_forward_cpu(const at::Tensor& gs_, const at::Tensor& gt_,
                                                        const at::Tensor& index_, int64_t patch_size,
                                                        int64_t window, bool squash, int64_t mode) {
  selfsim::check_features(gs_, "f_src", c10::DeviceType::CPU);
  selfsim::check_features(gt_, "f_tgt", c10::DeviceType::CPU);
  selfsim::check_pair(gs_, gt_);
  selfsim::check_index(index_, gs_);
  TORCH_CHECK(mode == selfsim::kL1 || mode == selfsim::kCos, "fastinpaint: mode must be 0 (l1) or 1 (cos), got ",
              mode);
  const at::Tensor &gs = gs_, &gt = gt_;  // any layout: Rows reads them
  const at::Tensor index = index_.contiguous();
  const int64_t B = gs.size(0), H = gs.size(1), W = gs.size(2), C = gs.size(3), Q = index.numel();
  const Geometry geo = selfsim::make_geometry(H, W, patch_size, window);
  check_index_values(index, H * W);
  const int64_t N = geo.entries(), num = N / 4;
  TORCH_CHECK(num >= 1, "fastinpaint: the maps have ", N,
              " entries per row; the l1 and cos distances need at least 4 (patch_size >= 2)");
  const auto acc_opts = gs.options().dtype(selfsim::acc_type(gs.scalar_type()));
  at::Tensor rows = new_output({B, Q}, acc_opts, at::MemoryFormat::Contiguous);
  at::Tensor stats = new_output({B, Q, selfsim::kStats}, acc_opts, at::MemoryFormat::Contiguous);
  if (rows.numel() == 0) {
    return {rows, stats};
  }
  const int64_t* ip = index.data_ptr<int64_t>();
  const std::vector<int64_t> order = spatial_order(ip, Q);
  dispatch_dtype(gs.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    acc_t* rp = rows.data_ptr<acc_t>();
    acc_t* stp = stats.data_ptr<acc_t>();
    const int64_t per = std::max<int64_t>(1, rows_per_task(N, C) / 2);
    const int64_t tasks = (B * Q + per - 1) / per;
    const Rows<T, acc_t> rows_s(gs, geo), rows_t(gt, geo);
    const ThresholdFn threshold = FI_PICK_ISA(top_threshold);
    parallel_tasks(tasks, [&](int64_t t) {
      std::vector<acc_t> S(N), Tr(N), scratch;
      std::vector<uint32_t> keys;
      for (int64_t rq = t * per; rq < std::min(B * Q, (t + 1) * per); ++rq) {
        const int64_t b = rq / Q, q = order[rq % Q], row = b * Q + q;
        rows_s(b, ip[q], squash, S.data());
        rows_t(b, ip[q], squash, Tr.data());
        acc_t thr;
        if constexpr (std::is_same_v<acc_t, float>) {
          thr = threshold(Tr.data(), N, num, keys);
        } else {
          thr = top_threshold(Tr.data(), N, num, scratch);
        }
        acc_t l1 = 0, st = 0, ss = 0, tt = 0;
        for (int64_t j = 0; j < N; ++j) {
          if (Tr[j] < thr) {
            continue;
          }
          l1 += std::abs(S[j] - Tr[j]);
          st += S[j] * Tr[j];
          ss += S[j] * S[j];
          tt += Tr[j] * Tr[j];
        }
        if (mode == selfsim::kL1) {
          rp[row] = l1;
        } else {
          const acc_t eps = acc_t(selfsim::kCosEps);
          const acc_t ns = std::max(std::sqrt(ss), eps), nt = std::max(std::sqrt(tt), eps);
          rp[row] = acc_t(1) - st / (ns * nt);
        }
        acc_t* s4 = stp + row * selfsim::kStats;
        s4[0] = thr;
        s4[1] = st;
        s4[2] = ss;
        s4[3] = tt;
      }
    });
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> distance_backward_cpu(const at::Tensor& grad_rows_, const at::Tensor& gs_,
                                                         const at::Tensor& gt_, const at::Tensor& index_,
                                                         const at::Tensor& stats_, int64_t patch_size,
                                                         int64_t window, bool squash, int64_t mode) {
  selfsim::check_features(gs_, "f_src", c10::DeviceType::CPU);
  selfsim::check_features(gt_, "f_tgt", c10::DeviceType::CPU);
  selfsim::check_pair(gs_, gt_);
  selfsim::check_index(index_, gs_);
  TORCH_CHECK(mode == selfsim::kL1 || mode == selfsim::kCos, "fastinpaint: mode must be 0 (l1) or 1 (cos), got ",
              mode);
  const at::Tensor &gs = gs_, &gt = gt_;  // any layout: Rows reads them
  const at::Tensor index = index_.contiguous();
  const int64_t B = gs.size(0), H = gs.size(1), W = gs.size(2), C = gs.size(3), Q = index.numel();
  const Geometry geo = selfsim::make_geometry(H, W, patch_size, window);
  check_index_values(index, H * W);
  const int64_t N = geo.entries();
  const auto acc = selfsim::acc_type(gs.scalar_type());
  TORCH_CHECK(grad_rows_.dim() == 2 && grad_rows_.size(0) == B && grad_rows_.size(1) == Q,
              "fastinpaint: grad_rows must have shape (B, Q) = (", B, ", ", Q, "), got ", grad_rows_.sizes());
  TORCH_CHECK(stats_.dim() == 3 && stats_.size(0) == B && stats_.size(1) == Q && stats_.size(2) == selfsim::kStats,
              "fastinpaint: stats must have shape (B, Q, 4), got ", stats_.sizes());
  const at::Tensor grad_rows = grad_rows_.to(acc).contiguous(), stats = stats_.to(acc).contiguous();
  at::Tensor dgs = new_gradient(gs);
  at::Tensor dgt = new_gradient(gt);
  if (dgs.numel() == 0) {
    return {dgs, dgt};
  }
  at::Tensor GS = at::empty({B, Q, N}, gs.options().dtype(acc));
  at::Tensor GT = at::empty({B, Q, N}, gs.options().dtype(acc));
  const int64_t* ip = index.data_ptr<int64_t>();
  const std::vector<int64_t> order = spatial_order(ip, Q);
  dispatch_dtype(gs.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    const acc_t* grp = grad_rows.data_ptr<acc_t>();
    const acc_t* stp = stats.data_ptr<acc_t>();
    acc_t* gsp = GS.data_ptr<acc_t>();
    acc_t* gtp = GT.data_ptr<acc_t>();
    const int64_t per = std::max<int64_t>(1, rows_per_task(N, C) / 2);
    const int64_t tasks = (B * Q + per - 1) / per;
    const Rows<T, acc_t> rows_s(gs, geo), rows_t(gt, geo);
    parallel_tasks(tasks, [&](int64_t t) {
      std::vector<acc_t> S(N), Tr(N);
      for (int64_t rq = t * per; rq < std::min(B * Q, (t + 1) * per); ++rq) {
        const int64_t b = rq / Q, q = order[rq % Q], row = b * Q + q;
        rows_s(b, ip[q], squash, S.data());
        rows_t(b, ip[q], squash, Tr.data());
        const acc_t* s4 = stp + row * selfsim::kStats;
        const acc_t thr = s4[0], gr = grp[row];
        acc_t* os = gsp + row * N;
        acc_t* ot = gtp + row * N;
        acc_t a = 0, bs = 0, bt = 0;  // cos: dL/dS_j = a T_j + bs S_j, dL/dT_j = a S_j + bt T_j
        if (mode == selfsim::kCos) {
          const acc_t eps = acc_t(selfsim::kCosEps);
          const acc_t ns_raw = std::sqrt(s4[2]), nt_raw = std::sqrt(s4[3]);
          const acc_t ns = std::max(ns_raw, eps), nt = std::max(nt_raw, eps);
          const acc_t cosv = s4[1] / (ns * nt);
          a = -gr / (ns * nt);
          bs = ns_raw > eps ? gr * cosv / (ns * ns) : acc_t(0);
          bt = nt_raw > eps ? gr * cosv / (nt * nt) : acc_t(0);
        }
        for (int64_t j = 0; j < N; ++j) {
          acc_t ds = 0, dt = 0;
          if (!(Tr[j] < thr)) {
            if (mode == selfsim::kL1) {
              const acc_t d = S[j] - Tr[j];
              ds = d > 0 ? gr : (d < 0 ? -gr : acc_t(0));
              dt = -ds;
            } else {
              ds = a * Tr[j] + bs * S[j];
              dt = a * S[j] + bt * Tr[j];
            }
            if (squash) {  // through tanh(x / 10)
              ds *= (acc_t(1) - S[j] * S[j]) / acc_t(selfsim::kTanhScale);
              dt *= (acc_t(1) - Tr[j] * Tr[j]) / acc_t(selfsim::kTanhScale);
            }
          }
          os[j] = ds;
          ot[j] = dt;
        }
      }
    });
    scatter_backward<T, acc_t>(gsp, rows_s, dgs, ip, order, B, Q, C, geo);
    scatter_backward<T, acc_t>(gtp, rows_t, dgt, ip, order, B, Q, C, geo);
  });
  return {dgs, dgt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) {
  m.impl("self_similarity_forward", &self_similarity_forward_cpu);
  m.impl("self_similarity_backward", &self_similarity_backward_cpu);
  m.impl("spatial_correlative_distance_forward", &distance_forward_cpu);
  m.impl("spatial_correlative_distance_backward", &distance_backward_cpu);
}

}  // namespace fastinpaint

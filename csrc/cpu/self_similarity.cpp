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

void check_index_values(const at::Tensor& index, int64_t HW) {
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < HW, "fastinpaint: query_index must lie in [0, H*W) = [0, ", HW,
                "), got ", ip[i], " at position ", i);
  }
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
    switch (isa_level()) {
      case 2: return &scatter_task_v4<T, acc_t>;
      case 1: return &scatter_task_v3<T, acc_t>;
      default: break;
    }
  }
#endif
  return &scatter_task_default<T, acc_t>;
}

template <typename T, typename acc_t>
RowFn<T, acc_t> pick_row() {
#if FI_X86_MULTIVERSION
  if constexpr (!std::is_same_v<T, double>) {
    switch (isa_level()) {
      case 2: return &similarity_row_v4<T, acc_t>;
      case 1: return &similarity_row_v3<T, acc_t>;
      default: break;
    }
  }
#endif
  return &similarity_row_default<T, acc_t>;
}

template <typename T, typename acc_t>
void scatter_backward(const acc_t* G, const T* gp, T* dgp, const int64_t* ip, int64_t B, int64_t Q, int64_t C,
                      const Geometry& geo) {
  const int64_t HW = geo.H * geo.W, N = geo.entries();
  // channel blocks of 8..64, enough of them for every thread (two tasks each)
  const int64_t want = std::max<int64_t>(1, 2 * at::get_num_threads());
  int64_t cw = (C * B + want - 1) / want;
  cw = std::min<int64_t>(64, std::max<int64_t>(8, (cw + 7) / 8 * 8));
  cw = std::min<int64_t>(cw, C);
  const int64_t nblk = (C + cw - 1) / cw;
  const ScatterFn<T, acc_t> task = pick_scatter<T, acc_t>();
  parallel_tasks(B * nblk, [&](int64_t t) {
    const int64_t b = t / nblk, c_lo = (t % nblk) * cw, n = std::min(cw, C - c_lo);
    std::vector<acc_t> acc(HW * n, acc_t(0));
    task(G, gp, ip, Q, C, geo, b, c_lo, n, acc.data());
    T* db = dgp + b * HW * C + c_lo;
    for (int64_t pos = 0; pos < HW; ++pos) {
      for (int64_t c = 0; c < n; ++c) {
        db[pos * C + c] = static_cast<T>(acc[pos * n + c]);
      }
    }
  });
}

at::Tensor self_similarity_forward_cpu(const at::Tensor& g_, const at::Tensor& index_, int64_t patch_size,
                                       int64_t window, bool squash) {
  selfsim::check_features(g_, "g", c10::DeviceType::CPU);
  selfsim::check_index(index_, g_);
  const at::Tensor g = g_.contiguous();
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
  dispatch_dtype(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    const T* gp = g.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t per = rows_per_task(N, C);
    const int64_t tasks = (B * Q + per - 1) / per;
    const RowFn<T, acc_t> similarity_row = pick_row<T, acc_t>();
    parallel_tasks(tasks, [&](int64_t t) {
      std::vector<acc_t> row(N);
      for (int64_t rq = t * per; rq < std::min(B * Q, (t + 1) * per); ++rq) {
        const int64_t b = rq / Q, q = rq % Q;
        similarity_row(gp + b * H * W * C, C, geo, ip[q], squash, row.data());
        T* o = op + rq * N;
        for (int64_t j = 0; j < N; ++j) {
          o[j] = static_cast<T>(row[j]);
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
  const at::Tensor g = g_.contiguous();
  const at::Tensor index = index_.contiguous();
  const int64_t B = g.size(0), H = g.size(1), W = g.size(2), C = g.size(3), Q = index.numel();
  const Geometry geo = selfsim::make_geometry(H, W, patch_size, window);
  check_index_values(index, H * W);
  TORCH_CHECK(grad_.dim() == 3 && grad_.size(0) == B && grad_.size(1) == Q && grad_.size(2) == geo.entries(),
              "fastinpaint: grad must have shape (B, Q, N) = (", B, ", ", Q, ", ", geo.entries(), "), got ",
              grad_.sizes());
  TORCH_CHECK(grad_.device() == g.device(), "fastinpaint: grad must be on ", g.device());
  const at::Tensor G = grad_.to(selfsim::acc_type(g.scalar_type())).contiguous();
  at::Tensor dg = new_output(g.sizes(), g.options(), at::MemoryFormat::Contiguous);
  if (dg.numel() == 0) {
    return dg;
  }
  const int64_t* ip = index.data_ptr<int64_t>();
  dispatch_dtype(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    scatter_backward<T, acc_t>(G.data_ptr<acc_t>(), g.data_ptr<T>(), dg.data_ptr<T>(), ip, B, Q, C, geo);
  });
  return dg;
}

// The threshold of a target row: its value at 0-based index num of the descending sort.
template <typename acc_t>
acc_t top_threshold(const acc_t* t, int64_t N, int64_t num, std::vector<acc_t>& scratch) {
  scratch.assign(t, t + N);
  std::nth_element(scratch.begin(), scratch.begin() + num, scratch.end(), std::greater<acc_t>());
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
  const at::Tensor gs = gs_.contiguous(), gt = gt_.contiguous(), index = index_.contiguous();
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
  dispatch_dtype(gs.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    const T* sp = gs.data_ptr<T>();
    const T* tp = gt.data_ptr<T>();
    acc_t* rp = rows.data_ptr<acc_t>();
    acc_t* stp = stats.data_ptr<acc_t>();
    const int64_t per = std::max<int64_t>(1, rows_per_task(N, C) / 2);
    const int64_t tasks = (B * Q + per - 1) / per;
    const RowFn<T, acc_t> similarity_row = pick_row<T, acc_t>();
    parallel_tasks(tasks, [&](int64_t t) {
      std::vector<acc_t> S(N), Tr(N), scratch;
      for (int64_t rq = t * per; rq < std::min(B * Q, (t + 1) * per); ++rq) {
        const int64_t b = rq / Q, q = rq % Q;
        similarity_row(sp + b * H * W * C, C, geo, ip[q], squash, S.data());
        similarity_row(tp + b * H * W * C, C, geo, ip[q], squash, Tr.data());
        const acc_t thr = top_threshold(Tr.data(), N, num, scratch);
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
          rp[rq] = l1;
        } else {
          const acc_t eps = acc_t(selfsim::kCosEps);
          const acc_t ns = std::max(std::sqrt(ss), eps), nt = std::max(std::sqrt(tt), eps);
          rp[rq] = acc_t(1) - st / (ns * nt);
        }
        acc_t* s4 = stp + rq * selfsim::kStats;
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
  const at::Tensor gs = gs_.contiguous(), gt = gt_.contiguous(), index = index_.contiguous();
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
  at::Tensor dgs = new_output(gs.sizes(), gs.options(), at::MemoryFormat::Contiguous);
  at::Tensor dgt = new_output(gt.sizes(), gt.options(), at::MemoryFormat::Contiguous);
  if (dgs.numel() == 0) {
    return {dgs, dgt};
  }
  at::Tensor GS = at::empty({B, Q, N}, gs.options().dtype(acc));
  at::Tensor GT = at::empty({B, Q, N}, gs.options().dtype(acc));
  const int64_t* ip = index.data_ptr<int64_t>();
  dispatch_dtype(gs.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    const T* sp = gs.data_ptr<T>();
    const T* tp = gt.data_ptr<T>();
    const acc_t* grp = grad_rows.data_ptr<acc_t>();
    const acc_t* stp = stats.data_ptr<acc_t>();
    acc_t* gsp = GS.data_ptr<acc_t>();
    acc_t* gtp = GT.data_ptr<acc_t>();
    const int64_t per = std::max<int64_t>(1, rows_per_task(N, C) / 2);
    const int64_t tasks = (B * Q + per - 1) / per;
    const RowFn<T, acc_t> similarity_row = pick_row<T, acc_t>();
    parallel_tasks(tasks, [&](int64_t t) {
      std::vector<acc_t> S(N), Tr(N);
      for (int64_t rq = t * per; rq < std::min(B * Q, (t + 1) * per); ++rq) {
        const int64_t b = rq / Q, q = rq % Q;
        similarity_row(sp + b * H * W * C, C, geo, ip[q], squash, S.data());
        similarity_row(tp + b * H * W * C, C, geo, ip[q], squash, Tr.data());
        const acc_t* s4 = stp + rq * selfsim::kStats;
        const acc_t thr = s4[0], gr = grp[rq];
        acc_t* os = gsp + rq * N;
        acc_t* ot = gtp + rq * N;
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
    scatter_backward<T, acc_t>(gsp, sp, dgs.data_ptr<T>(), ip, B, Q, C, geo);
    scatter_backward<T, acc_t>(gtp, tp, dgt.data_ptr<T>(), ip, B, Q, C, geo);
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

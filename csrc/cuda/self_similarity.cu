// CUDA kernels of the self-similarity maps and the fused spatially-correlative distance
// (F-LSeSim). Math: fastinpaint/ops/self_similarity/reference.py; geometry and checks:
// csrc/self_similarity.h. g is (B, H, W, C) contiguous: a position's C values are contiguous.
//
//   maps forward      one block per query row; one warp per window entry at a time, its lanes
//                     striding over C (coalesced), warp-shuffle reduction.
//   maps backward     deterministic, no atomics: (1) one block per query row computes
//                     vq = sum_j G[q,j] g[key j] (B, Q, C float32); (2) one thread per
//                     (position, channel) sums G[q, entry of p in q's window] * g[query q]
//                     plus vq[q] where p is q: over the K*K queries whose window holds p in
//                     the dense form (every position a query, zero windows: a gather), else
//                     looping over the queries.
//   distance forward  one block per query row: both rows computed into shared memory (never
//                     written to global memory), the target row's top-quarter threshold by a
//                     33-step bisection over the floats' order-preserving integer keys (block
//                     counts), then block reductions for the l1 sum / cosine terms.
//   distance backward the rows recomputed, per-entry coefficients written to two (B, Q, N)
//                     float32 buffers, then the maps' backward for each image.
//
// Query positions outside [0, H*W) (checked in Python, but not under torch.compile) give NaN
// rows and are skipped in backward: never an out-of-bounds read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "common.h"
#include "self_similarity.h"

namespace fastinpaint {
namespace {

using selfsim::Geometry;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // lane 0 holds the sum
}

// Sum over the block; every thread gets the result. scratch: kWarps values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch reuse
  if (lane == 0) {
    scratch[warp] = v;
  }
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    total += scratch[w];
  }
  return total;
}

// Raw similarity rows of query position p for up to two images into shared rows, one warp per
// entry. gq_*: the query vectors staged in shared memory (C values each).
template <typename T, typename acc_t, typename R, int NIMG>
__device__ void compute_rows(const T* const* gb, acc_t* const* gq, R* const* rows, const Geometry& geo,
                             int64_t C, int64_t p, bool squash) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t r0, c0;
  geo.start(p, r0, c0);
  const int64_t N = geo.entries();
  const uint32_t kw = static_cast<uint32_t>(geo.kw);  // N < 2^31: make_geometry checks it
  for (int64_t j = warp; j < N; j += kWarps) {
    const uint32_t ju = static_cast<uint32_t>(j);
    const int64_t r = r0 + ju / kw, c = c0 + ju % kw;
    const bool valid = r >= 0 && r < geo.H && c >= 0 && c < geo.W;
    acc_t acc[NIMG];
#pragma unroll
    for (int m = 0; m < NIMG; ++m) {
      acc[m] = 0;
    }
    if (valid) {
      const int64_t kp = (r * geo.W + c) * C;
      for (int64_t ch = lane; ch < C; ch += 32) {
#pragma unroll
        for (int m = 0; m < NIMG; ++m) {
          acc[m] += static_cast<acc_t>(gb[m][kp + ch]) * gq[m][ch];
        }
      }
    }
#pragma unroll
    for (int m = 0; m < NIMG; ++m) {
      acc_t v = warp_sum(acc[m]);
      if (lane == 0) {
        if (valid && squash) {
          v = tanh_(v / acc_t(selfsim::kTanhScale));
        }
        rows[m][j] = static_cast<R>(valid ? v : acc_t(0));
      }
    }
  }
}

template <typename T, typename acc_t, int NIMG>
__device__ void stage_queries(const T* const* gb, acc_t* const* gq, int64_t C, int64_t p) {
  for (int64_t ch = threadIdx.x; ch < C; ch += blockDim.x) {
#pragma unroll
    for (int m = 0; m < NIMG; ++m) {
      gq[m][ch] = static_cast<acc_t>(gb[m][p * C + ch]);
    }
  }
}

// Dynamic shared memory, typed per instantiation.
template <typename acc_t>
__device__ acc_t* shared_buffer() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<acc_t*>(smem_raw);
}

template <typename T, typename acc_t>
__global__ void maps_forward_kernel(const T* __restrict__ g, const int64_t* __restrict__ index, T* __restrict__ out,
                                    Geometry geo, int64_t Q, int64_t C, bool squash) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / Q, q = row % Q;
  const int64_t HW = geo.H * geo.W, N = geo.entries();
  const int64_t p = index[q];
  T* o = out + row * N;
  if (p < 0 || p >= HW) {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      o[j] = static_cast<T>(NAN);
    }
    return;
  }
  acc_t* gq = shared_buffer<acc_t>();  // the query vector, C values
  const T* gbs[1] = {g + b * HW * C};
  acc_t* gqs[1] = {gq};
  T* rows[1] = {o};
  stage_queries<T, acc_t, 1>(gbs, gqs, C, p);
  __syncthreads();
  compute_rows<T, acc_t, T, 1>(gbs, gqs, rows, geo, C, p, squash);
}

// vq[b, q, :] = sum_j G[b, q, j] * g[b, key j, :]
template <typename T, typename acc_t>
__global__ void query_grad_kernel(const acc_t* __restrict__ G, const T* __restrict__ g,
                                  const int64_t* __restrict__ index, acc_t* __restrict__ vq, Geometry geo, int64_t Q,
                                  int64_t C) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / Q, q = row % Q;
  const int64_t HW = geo.H * geo.W, N = geo.entries();
  const int64_t p = index[q];
  acc_t* out = vq + row * C;
  const int64_t ch = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (ch >= C) {
    return;
  }
  acc_t acc = 0;
  if (p >= 0 && p < HW) {
    int64_t r0, c0;
    geo.start(p, r0, c0);
    const T* gb = g + b * HW * C;
    const acc_t* Gr = G + row * N;
    for (int64_t i = 0; i < geo.kh; ++i) {  // window row by row: no division per entry
      const int64_t r = r0 + i;
      if (r < 0 || r >= geo.H) {
        continue;
      }
      const int64_t k_lo = c0 < 0 ? -c0 : 0, k_hi = geo.W - c0 < geo.kw ? geo.W - c0 : geo.kw;
      for (int64_t k = k_lo; k < k_hi; ++k) {
        acc += Gr[i * geo.kw + k] * static_cast<acc_t>(gb[(r * geo.W + c0 + k) * C + ch]);
      }
    }
  }
  out[ch] = acc;
}

// dg[b, p, c] = sum_q G[b, q, entry of p in q's window] * g[b, index[q], c] + sum_{q: index[q]=p} vq[b, q, c]
// Threads: 32 channels x 8 positions per block; the queries' window corners staged in shared memory.
constexpr int kQChunk = 256;

template <typename T, typename acc_t>
__global__ void key_grad_kernel(const acc_t* __restrict__ G, const T* __restrict__ g,
                                const int64_t* __restrict__ index, const acc_t* __restrict__ vq,
                                T* __restrict__ dg, Geometry geo, int64_t Q, int64_t C) {
  __shared__ int64_t s_p[kQChunk], s_r0[kQChunk], s_c0[kQChunk];
  const int64_t b = blockIdx.z;
  const int64_t HW = geo.H * geo.W, N = geo.entries();
  const int64_t ch = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.y;
  const bool active = ch < C && pos < HW;
  const int64_t pr = pos / geo.W, pc = pos % geo.W;
  const T* gb = g + b * HW * C;
  acc_t acc = 0;
  const int tid = threadIdx.y * 32 + threadIdx.x;
  for (int64_t q0 = 0; q0 < Q; q0 += kQChunk) {
    const int64_t nq = Q - q0 < kQChunk ? Q - q0 : kQChunk;
    __syncthreads();
    for (int64_t i = tid; i < nq; i += blockDim.x * blockDim.y) {
      const int64_t p = index[q0 + i];
      int64_t r0 = 0, c0 = 0;
      if (p >= 0 && p < HW) {
        geo.start(p, r0, c0);
        s_p[i] = p;
      } else {
        s_p[i] = -1;
      }
      s_r0[i] = r0;
      s_c0[i] = c0;
    }
    __syncthreads();
    if (!active) {
      continue;
    }
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t p = s_p[i];
      if (p < 0) {
        continue;
      }
      const int64_t q = q0 + i;
      const int64_t di = pr - s_r0[i], dj = pc - s_c0[i];
      if (di >= 0 && di < geo.kh && dj >= 0 && dj < geo.kw) {
        acc += G[(b * Q + q) * N + di * geo.kw + dj] * static_cast<acc_t>(gb[p * C + ch]);
      }
      if (p == pos) {
        acc += vq[(b * Q + q) * C + ch];
      }
    }
  }
  if (active) {
    dg[(b * HW + pos) * C + ch] = static_cast<T>(acc);
  }
}

// Dense form (geo.dense: query q is position q, zero windows): the queries whose window holds
// position p are p - (i - K/2, k - K/2), at entry i*K + k, so dg[b, p, c] gathers those K*K
// directly, plus vq[b, p, c] (p's own query): O(K*K) per output instead of a loop over all queries.
// Threads: 32 channels x 8 positions per block, like key_grad_kernel.
template <typename T, typename acc_t>
__global__ void dense_key_grad_kernel(const acc_t* __restrict__ G, const T* __restrict__ g,
                                      const acc_t* __restrict__ vq, T* __restrict__ dg, Geometry geo, int64_t C) {
  const int64_t b = blockIdx.z;
  const int64_t HW = geo.H * geo.W, N = geo.entries(), K = geo.K, half = geo.K / 2;
  const int64_t ch = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.y;
  if (ch >= C || pos >= HW) {
    return;
  }
  const int64_t pr = pos / geo.W, pc = pos - pr * geo.W;  // once per thread
  const T* gb = g + b * HW * C;
  const acc_t* Gb = G + b * HW * N;
  acc_t acc = vq[(b * HW + pos) * C + ch];
  for (int64_t i = 0; i < K; ++i) {
    const int64_t qr = pr + half - i;
    if (qr < 0 || qr >= geo.H) {
      continue;
    }
    // qc = pc + half - k in [0, W)  <=>  k in (pc + half - W, pc + half]
    const int64_t k_lo = pc + half - geo.W + 1 > 0 ? pc + half - geo.W + 1 : 0;
    const int64_t k_hi = pc + half + 1 < K ? pc + half + 1 : K;
    for (int64_t k = k_lo; k < k_hi; ++k) {
      const int64_t q = qr * geo.W + pc + half - k;
      acc += Gb[q * N + i * K + k] * static_cast<acc_t>(gb[q * C + ch]);
    }
  }
  dg[(b * HW + pos) * C + ch] = static_cast<T>(acc);
}

template <typename T, typename acc_t>
void scatter_backward(const at::Tensor& G, const at::Tensor& g, const at::Tensor& index, at::Tensor& dg,
                      const Geometry& geo, cudaStream_t stream) {
  const int64_t B = g.size(0), C = g.size(3), Q = index.numel(), HW = geo.H * geo.W;
  at::Tensor vq = at::empty({B, Q, C}, G.options());
  {
    const dim3 grid(static_cast<unsigned>(B * Q), static_cast<unsigned>((C + 127) / 128));
    query_grad_kernel<T, acc_t><<<grid, 128, 0, stream>>>(G.const_data_ptr<acc_t>(), g.const_data_ptr<T>(),
                                                          index.const_data_ptr<int64_t>(),
                                                          vq.mutable_data_ptr<acc_t>(), geo, Q, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  {
    const dim3 grid(static_cast<unsigned>((HW + 7) / 8), static_cast<unsigned>((C + 31) / 32),
                    static_cast<unsigned>(B));
    if (geo.dense) {
      TORCH_CHECK(Q == HW, "fastinpaint: window code 2 (dense) needs every position as a query, got ", Q,
                  " queries for ", HW, " positions");
      dense_key_grad_kernel<T, acc_t><<<grid, dim3(32, 8), 0, stream>>>(
          G.const_data_ptr<acc_t>(), g.const_data_ptr<T>(), vq.const_data_ptr<acc_t>(),
          dg.mutable_data_ptr<T>(), geo, C);
    } else {
      key_grad_kernel<T, acc_t><<<grid, dim3(32, 8), 0, stream>>>(
          G.const_data_ptr<acc_t>(), g.const_data_ptr<T>(), index.const_data_ptr<int64_t>(),
          vq.const_data_ptr<acc_t>(), dg.mutable_data_ptr<T>(), geo, Q, C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Order-preserving integer key of a float / double (signed comparison = value comparison).
__device__ __forceinline__ int64_t order_key(float x) {
  const int32_t bits = __float_as_int(x);
  return static_cast<int64_t>(bits >= 0 ? bits : bits ^ 0x7FFFFFFF);
}
__device__ __forceinline__ float from_key(int64_t k, float) {
  const int32_t v = static_cast<int32_t>(k);
  return __int_as_float(v >= 0 ? v : v ^ 0x7FFFFFFF);
}
// float64 rows: 64-bit keys.
__device__ __forceinline__ int64_t order_key(double x) {
  const long long bits = __double_as_longlong(x);
  return bits >= 0 ? bits : bits ^ 0x7FFFFFFFFFFFFFFFLL;
}
__device__ __forceinline__ double from_key(int64_t k, double) {
  return __longlong_as_double(k >= 0 ? k : k ^ 0x7FFFFFFFFFFFFFFFLL);
}

// The value at 0-based index num of the descending sort of t[0, N).
template <typename acc_t>
__device__ acc_t row_threshold(const acc_t* t, int64_t N, int64_t num) {
  __shared__ int s_cnt[kWarps];
  // min / max key (block reductions through counts would need more passes; a linear scan of
  // the shared row per thread then a shared-memory reduction)
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const int64_t k = order_key(t[j]);
    lo = k < lo ? k : lo;
    hi = k > hi ? k : hi;
  }
  __shared__ int64_t s_lo[kThreads], s_hi[kThreads];
  s_lo[threadIdx.x] = lo;
  s_hi[threadIdx.x] = hi;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      s_lo[threadIdx.x] = s_lo[threadIdx.x + s] < s_lo[threadIdx.x] ? s_lo[threadIdx.x + s] : s_lo[threadIdx.x];
      s_hi[threadIdx.x] = s_hi[threadIdx.x + s] > s_hi[threadIdx.x] ? s_hi[threadIdx.x + s] : s_hi[threadIdx.x];
    }
    __syncthreads();
  }
  lo = s_lo[0];
  hi = s_hi[0];
  __syncthreads();
  // invariant: count(key >= lo) >= num + 1, count(key >= hi + 1) < num + 1 (hi itself may qualify)
  while (lo < hi) {
    // mid in (lo, hi], computed without overflow
    const int64_t mid = lo + static_cast<int64_t>((static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) + 1) / 2);
    int cnt = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      cnt += order_key(t[j]) >= mid;
    }
    const int total = block_sum<int>(cnt, s_cnt);
    if (total >= num + 1) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return from_key(lo, acc_t(0));
}

template <typename T, typename acc_t>
__global__ void distance_forward_kernel(const T* __restrict__ gs, const T* __restrict__ gt,
                                        const int64_t* __restrict__ index, acc_t* __restrict__ rows_out,
                                        acc_t* __restrict__ stats, Geometry geo, int64_t Q, int64_t C, bool squash,
                                        int64_t mode) {
  __shared__ acc_t scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t b = row / Q, q = row % Q;
  const int64_t HW = geo.H * geo.W, N = geo.entries(), num = N / 4;
  const int64_t p = index[q];
  if (p < 0 || p >= HW) {
    if (threadIdx.x == 0) {
      rows_out[row] = acc_t(NAN);
      for (int k = 0; k < selfsim::kStats; ++k) {
        stats[row * selfsim::kStats + k] = acc_t(NAN);
      }
    }
    return;
  }
  acc_t* smem = shared_buffer<acc_t>();
  acc_t* qs = smem;
  acc_t* qt = smem + C;
  acc_t* S = smem + 2 * C;
  acc_t* Tr = S + N;
  const T* gbs[2] = {gs + b * HW * C, gt + b * HW * C};
  acc_t* gqs[2] = {qs, qt};
  acc_t* rws[2] = {S, Tr};
  stage_queries<T, acc_t, 2>(gbs, gqs, C, p);
  __syncthreads();
  compute_rows<T, acc_t, acc_t, 2>(gbs, gqs, rws, geo, C, p, squash);
  __syncthreads();
  const acc_t thr = row_threshold(Tr, N, num);
  acc_t l1 = 0, st = 0, ss = 0, tt = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    if (Tr[j] < thr) {
      continue;
    }
    const acc_t s = S[j], t = Tr[j];
    l1 += s > t ? s - t : t - s;
    st += s * t;
    ss += s * s;
    tt += t * t;
  }
  l1 = block_sum(l1, scratch);
  st = block_sum(st, scratch);
  ss = block_sum(ss, scratch);
  tt = block_sum(tt, scratch);
  if (threadIdx.x == 0) {
    if (mode == selfsim::kL1) {
      rows_out[row] = l1;
    } else {
      const acc_t eps = acc_t(selfsim::kCosEps);
      const acc_t ns = sqrt_(ss) > eps ? sqrt_(ss) : eps, nt = sqrt_(tt) > eps ? sqrt_(tt) : eps;
      rows_out[row] = acc_t(1) - st / (ns * nt);
    }
    acc_t* s4 = stats + row * selfsim::kStats;
    s4[0] = thr;
    s4[1] = st;
    s4[2] = ss;
    s4[3] = tt;
  }
}

template <typename T, typename acc_t>
__global__ void distance_coef_kernel(const T* __restrict__ gs, const T* __restrict__ gt,
                                     const int64_t* __restrict__ index, const acc_t* __restrict__ grad_rows,
                                     const acc_t* __restrict__ stats, acc_t* __restrict__ GS,
                                     acc_t* __restrict__ GT, Geometry geo, int64_t Q, int64_t C, bool squash,
                                     int64_t mode) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / Q, q = row % Q;
  const int64_t HW = geo.H * geo.W, N = geo.entries();
  const int64_t p = index[q];
  acc_t* os = GS + row * N;
  acc_t* ot = GT + row * N;
  if (p < 0 || p >= HW) {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      os[j] = 0;
      ot[j] = 0;
    }
    return;
  }
  acc_t* smem = shared_buffer<acc_t>();
  acc_t* qs = smem;
  acc_t* qt = smem + C;
  acc_t* S = smem + 2 * C;
  acc_t* Tr = S + N;
  const T* gbs[2] = {gs + b * HW * C, gt + b * HW * C};
  acc_t* gqs[2] = {qs, qt};
  acc_t* rws[2] = {S, Tr};
  stage_queries<T, acc_t, 2>(gbs, gqs, C, p);
  __syncthreads();
  compute_rows<T, acc_t, acc_t, 2>(gbs, gqs, rws, geo, C, p, squash);
  __syncthreads();
  const acc_t* s4 = stats + row * selfsim::kStats;
  const acc_t thr = s4[0], gr = grad_rows[row];
  acc_t a = 0, bs = 0, bt = 0;
  if (mode == selfsim::kCos) {
    const acc_t eps = acc_t(selfsim::kCosEps);
    const acc_t ns_raw = sqrt_(s4[2]), nt_raw = sqrt_(s4[3]);
    const acc_t ns = ns_raw > eps ? ns_raw : eps, nt = nt_raw > eps ? nt_raw : eps;
    const acc_t cosv = s4[1] / (ns * nt);
    a = -gr / (ns * nt);
    bs = ns_raw > eps ? gr * cosv / (ns * ns) : acc_t(0);
    bt = nt_raw > eps ? gr * cosv / (nt * nt) : acc_t(0);
  }
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    acc_t ds = 0, dt = 0;
    const acc_t s = S[j], t = Tr[j];
    if (!(t < thr)) {
      if (mode == selfsim::kL1) {
        const acc_t d = s - t;
        ds = d > 0 ? gr : (d < 0 ? -gr : acc_t(0));
        dt = -ds;
      } else {
        ds = a * t + bs * s;
        dt = a * s + bt * t;
      }
      if (squash) {
        ds *= (acc_t(1) - s * s) / acc_t(selfsim::kTanhScale);
        dt *= (acc_t(1) - t * t) / acc_t(selfsim::kTanhScale);
      }
    }
    os[j] = ds;
    ot[j] = dt;
  }
}

// Dynamic shared memory of the row kernels, checked with the kernel's own static shared memory
// (cudaFuncGetAttributes: the block reductions' scratch) against the device's opt-in limit.
template <typename Kernel>
size_t prepare_smem(Kernel kernel, size_t bytes) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  TORCH_CHECK(bytes + attr.sharedSizeBytes <= static_cast<size_t>(limit), "fastinpaint: a map row of this size (",
              bytes, " bytes of shared memory with the query vectors, ", attr.sharedSizeBytes,
              " more for the kernel's reductions) exceeds the GPU's ", limit,
              " bytes per block; use fewer channels, a smaller patch_size, or the reference backend");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  return bytes;
}

struct Prepared {
  at::Tensor g, index;
  Geometry geo;
};

Prepared prepare(const at::Tensor& g_, const at::Tensor& index_, int64_t patch_size, int64_t window,
                 const char* name) {
  selfsim::check_features(g_, name, c10::DeviceType::CUDA);
  selfsim::check_index(index_, g_);
  Prepared pr{g_.contiguous(), index_.contiguous(), {}};
  pr.geo = selfsim::make_geometry(g_.size(1), g_.size(2), patch_size, window);
  TORCH_CHECK(index_.numel() <= std::numeric_limits<int32_t>::max() / 2 && g_.size(0) <= 65535,
              "fastinpaint: too many queries or images for one launch");
  return pr;
}

at::Tensor self_similarity_forward_cuda(const at::Tensor& g_, const at::Tensor& index_, int64_t patch_size,
                                        int64_t window, bool squash) {
  Prepared pr = prepare(g_, index_, patch_size, window, "g");
  const c10::cuda::CUDAGuard guard(g_.device());
  const int64_t B = pr.g.size(0), C = pr.g.size(3), Q = pr.index.numel(), N = pr.geo.entries();
  at::Tensor out = new_output({B, Q, N}, pr.g.options(), at::MemoryFormat::Contiguous);
  if (out.numel() == 0) {
    return out;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.g.scalar_type(), "fastinpaint_selfsim_fwd", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    auto kernel = maps_forward_kernel<scalar_t, acc_t>;
    const size_t smem = prepare_smem(kernel, sizeof(acc_t) * C);
    kernel<<<static_cast<unsigned>(B * Q), kThreads, smem, stream>>>(
        pr.g.const_data_ptr<scalar_t>(), pr.index.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
        pr.geo, Q, C, squash);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor self_similarity_backward_cuda(const at::Tensor& grad, const at::Tensor& g_, const at::Tensor& index_,
                                         int64_t patch_size, int64_t window) {
  Prepared pr = prepare(g_, index_, patch_size, window, "g");
  const c10::cuda::CUDAGuard guard(g_.device());
  const int64_t B = pr.g.size(0), Q = pr.index.numel(), N = pr.geo.entries();
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == Q && grad.size(2) == N,
              "fastinpaint: grad must have shape (B, Q, N) = (", B, ", ", Q, ", ", N, "), got ", grad.sizes());
  TORCH_CHECK(grad.device() == g_.device(), "fastinpaint: grad must be on ", g_.device());
  at::Tensor dg = new_output(pr.g.sizes(), pr.g.options(), at::MemoryFormat::Contiguous);
  if (dg.numel() == 0) {
    return dg;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor G = grad.to(selfsim::acc_type(pr.g.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.g.scalar_type(), "fastinpaint_selfsim_bwd", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    scatter_backward<scalar_t, acc_t>(G, pr.g, pr.index, dg, pr.geo, stream);
  });
  return dg;
}

std::tuple<at::Tensor, at::Tensor> distance_forward_cuda(const at::Tensor& gs_, const at::Tensor& gt_,
                                                         const at::Tensor& index_, int64_t patch_size,
                                                         int64_t window, bool squash, int64_t mode) {
  selfsim::check_pair(gs_, gt_);
  Prepared ps = prepare(gs_, index_, patch_size, window, "f_src");
  selfsim::check_features(gt_, "f_tgt", c10::DeviceType::CUDA);
  TORCH_CHECK(mode == selfsim::kL1 || mode == selfsim::kCos, "fastinpaint: mode must be 0 (l1) or 1 (cos), got ",
              mode);
  const c10::cuda::CUDAGuard guard(gs_.device());
  const at::Tensor gt = gt_.contiguous();
  const int64_t B = ps.g.size(0), C = ps.g.size(3), Q = ps.index.numel(), N = ps.geo.entries();
  TORCH_CHECK(N / 4 >= 1, "fastinpaint: the maps have ", N,
              " entries per row; the l1 and cos distances need at least 4 (patch_size >= 2)");
  const auto acc_opts = ps.g.options().dtype(selfsim::acc_type(ps.g.scalar_type()));
  at::Tensor rows = new_output({B, Q}, acc_opts, at::MemoryFormat::Contiguous);
  at::Tensor stats = new_output({B, Q, selfsim::kStats}, acc_opts, at::MemoryFormat::Contiguous);
  if (rows.numel() == 0) {
    return {rows, stats};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ps.g.scalar_type(), "fastinpaint_scd_fwd", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    auto kernel = distance_forward_kernel<scalar_t, acc_t>;
    const size_t smem = prepare_smem(kernel, sizeof(acc_t) * (2 * C + 2 * N));
    kernel<<<static_cast<unsigned>(B * Q), kThreads, smem, stream>>>(
        ps.g.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), ps.index.const_data_ptr<int64_t>(),
        rows.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(), ps.geo, Q, C, squash, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> distance_backward_cuda(const at::Tensor& grad_rows_, const at::Tensor& gs_,
                                                          const at::Tensor& gt_, const at::Tensor& index_,
                                                          const at::Tensor& stats_, int64_t patch_size,
                                                          int64_t window, bool squash, int64_t mode) {
  selfsim::check_pair(gs_, gt_);
  Prepared ps = prepare(gs_, index_, patch_size, window, "f_src");
  selfsim::check_features(gt_, "f_tgt", c10::DeviceType::CUDA);
  TORCH_CHECK(mode == selfsim::kL1 || mode == selfsim::kCos, "fastinpaint: mode must be 0 (l1) or 1 (cos), got ",
              mode);
  const c10::cuda::CUDAGuard guard(gs_.device());
  const at::Tensor gt = gt_.contiguous();
  const int64_t B = ps.g.size(0), C = ps.g.size(3), Q = ps.index.numel(), N = ps.geo.entries();
  TORCH_CHECK(grad_rows_.dim() == 2 && grad_rows_.size(0) == B && grad_rows_.size(1) == Q,
              "fastinpaint: grad_rows must have shape (B, Q) = (", B, ", ", Q, "), got ", grad_rows_.sizes());
  TORCH_CHECK(stats_.dim() == 3 && stats_.size(0) == B && stats_.size(1) == Q && stats_.size(2) == selfsim::kStats,
              "fastinpaint: stats must have shape (B, Q, 4), got ", stats_.sizes());
  const auto acc = selfsim::acc_type(ps.g.scalar_type());
  const at::Tensor grad_rows = grad_rows_.to(acc).contiguous(), stats = stats_.to(acc).contiguous();
  at::Tensor dgs = new_output(ps.g.sizes(), ps.g.options(), at::MemoryFormat::Contiguous);
  at::Tensor dgt = new_output(gt.sizes(), gt.options(), at::MemoryFormat::Contiguous);
  if (dgs.numel() == 0) {
    return {dgs, dgt};
  }
  at::Tensor GS = at::empty({B, Q, N}, ps.g.options().dtype(acc));
  at::Tensor GT = at::empty({B, Q, N}, ps.g.options().dtype(acc));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ps.g.scalar_type(), "fastinpaint_scd_bwd", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    auto kernel = distance_coef_kernel<scalar_t, acc_t>;
    const size_t smem = prepare_smem(kernel, sizeof(acc_t) * (2 * C + 2 * N));
    kernel<<<static_cast<unsigned>(B * Q), kThreads, smem, stream>>>(
        ps.g.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), ps.index.const_data_ptr<int64_t>(),
        grad_rows.const_data_ptr<acc_t>(), stats.const_data_ptr<acc_t>(), GS.mutable_data_ptr<acc_t>(),
        GT.mutable_data_ptr<acc_t>(), ps.geo, Q, C, squash, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scatter_backward<scalar_t, acc_t>(GS, ps.g, ps.index, dgs, ps.geo, stream);
    scatter_backward<scalar_t, acc_t>(GT, gt, ps.index, dgt, ps.geo, stream);
  });
  return {dgs, dgt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CUDA, m) {
  m.impl("self_similarity_forward", &self_similarity_forward_cuda);
  m.impl("self_similarity_backward", &self_similarity_backward_cuda);
  m.impl("spatial_correlative_distance_forward", &distance_forward_cuda);
  m.impl("spatial_correlative_distance_backward", &distance_backward_cuda);
}

}  // namespace fastinpaint

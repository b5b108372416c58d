// Shared by the CPU and CUDA kernels of the self-similarity maps and the
// spatially-correlative distance (fastinpaint/ops/self_similarity/reference.py has the math).
//
// Operands: g (B, H, W, C) contiguous, the centred and normalised features with the
// channels innermost, so that every position's vector is C contiguous values; index (Q,)
// int64 flat positions q = row * W + col.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FI_HD __host__ __device__ __forceinline__
#else
#define FI_HD inline
#endif

namespace fastinpaint {
namespace selfsim {

// kDenseZero: the zero window, with the caller's promise that the queries are every position in
// order (index = 0 .. H*W-1): the kernels may then invert the windows (the CUDA backward gathers).
enum Window : int64_t { kClamp = 0, kZero = 1, kDenseZero = 2 };
enum Mode : int64_t { kL1 = 0, kCos = 1 };
constexpr double kTanhScale = 10.0;  // normalize=False: s -> tanh(s / 10)
constexpr double kCosEps = 1e-8;     // F.cosine_similarity's eps
constexpr int kStats = 4;            // per row: threshold, <S', T'>, |S'|^2, |T'|^2

// Window geometry of one call: kh x kw windows; their top-left corner per query.
struct Geometry {
  int64_t H, W, K, kh, kw;
  bool whole;  // clamp mode with K >= H or K >= W: the window is the whole map
  int64_t window;  // kClamp or kZero
  bool dense;      // kDenseZero given: query q is position q

  FI_HD int64_t entries() const { return kh * kw; }

  // Top-left (r0, c0) of query position p's window (may be negative in zero mode).
  FI_HD void start(int64_t p, int64_t& r0, int64_t& c0) const {
    if (whole) {
      r0 = 0;
      c0 = 0;
      return;
    }
    const int64_t r = p / W, c = p % W;
    r0 = r - K / 2;
    c0 = c - K / 2;
    if (window == kClamp) {
      r0 = r0 < 0 ? 0 : (r0 > H - kh ? H - kh : r0);
      c0 = c0 < 0 ? 0 : (c0 > W - kw ? W - kw : c0);
    }
  }
};

inline Geometry make_geometry(int64_t H, int64_t W, int64_t K, int64_t window) {
  TORCH_CHECK(K >= 1, "fastinpaint: patch_size must be >= 1, got ", K);
  TORCH_CHECK(window == kClamp || window == kZero || window == kDenseZero,
              "fastinpaint: window must be 0 (clamp), 1 (zero) or 2 (zero, every position a query), got ",
              window);
  TORCH_CHECK(H * W <= std::numeric_limits<int32_t>::max() && K <= 46340,
              "fastinpaint: the map (", H, "x", W, ") or patch_size (", K, ") is too large for one window index");
  Geometry geo{H, W, K, K, K, false, window == kClamp ? kClamp : kZero, window == kDenseZero};
  if (window == kClamp && (K >= H || K >= W)) {
    geo.kh = H;
    geo.kw = W;
    geo.whole = true;
  }
  return geo;
}

inline void check_features(const at::Tensor& g, const char* name, c10::DeviceType device) {
  TORCH_CHECK(g.dim() == 4, "fastinpaint: ", name, " must be 4-D (B, H, W, C), got ", g.dim(), "-D");
  const auto st = g.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastinpaint: ", name, " must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(g.device().type() == device, "fastinpaint: ", name, " must be a ",
              c10::DeviceTypeName(device), " tensor, got ", g.device());
  TORCH_CHECK(g.size(1) > 0 && g.size(2) > 0 && g.size(3) > 0, "fastinpaint: ", name,
              " must have a positive height, width and channel count, got ", g.sizes());
}

inline void check_index(const at::Tensor& index, const at::Tensor& g) {
  TORCH_CHECK(index.dim() == 1, "fastinpaint: query_index must be 1-D, got ", index.dim(), "-D");
  TORCH_CHECK(index.scalar_type() == at::kLong, "fastinpaint: query_index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.device() == g.device(), "fastinpaint: query_index must be on ", g.device(),
              ", got ", index.device());
}

inline void check_pair(const at::Tensor& gs, const at::Tensor& gt) {
  TORCH_CHECK(gs.sizes() == gt.sizes(), "fastinpaint: f_src and f_tgt must have the same shape, got ",
              gs.sizes(), " and ", gt.sizes());
  TORCH_CHECK(gs.scalar_type() == gt.scalar_type(),
              "fastinpaint: f_src and f_tgt must have the same dtype, got ", gs.scalar_type(), " and ",
              gt.scalar_type());
  TORCH_CHECK(gs.device() == gt.device(), "fastinpaint: f_src and f_tgt must be on the same device");
}

inline at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace selfsim
}  // namespace fastinpaint

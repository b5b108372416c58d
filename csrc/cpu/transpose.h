// Blocked transposition of a matrix on the CPU, shared by the layout copy (layout_copy.cpp) and
// the gated convolution's NCHW-writing gating (gated_conv.cpp):
//
//     dst[c * dst_stride + r] = src[r * src_stride + c]    rows [r0, r1), columns [c0, c1)
//
// in tiles that stay in L1; float32 in 8x8 blocks transposed in registers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_common.h"

namespace fastinpaint {
namespace transpose {

constexpr int64_t kTile = 32;

// In kTile-column steps (a kTile x kTile tile of each stays in L1).
template <typename T>
inline void block(const T* FI_RESTRICT src, int64_t src_stride, T* FI_RESTRICT dst, int64_t dst_stride, int64_t r0,
                  int64_t r1, int64_t c0, int64_t c1) {
  for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
    const int64_t t1 = std::min(c1, t0 + kTile);
    for (int64_t c = t0; c < t1; ++c) {
      T* d = dst + c * dst_stride;
      for (int64_t r = r0; r < r1; ++r) {
        d[r] = src[r * src_stride + c];
      }
    }
  }
}

// The float32 form of block: 8x8 blocks transposed in registers (three rounds of two-vector
// shuffles), loaded and stored as rows of 8; the edges by the scalar loop. (GCC's
// __builtin_shuffle; other compilers take the scalar loop throughout.)
FI_INLINE void block_f32_body(const float* FI_RESTRICT src, int64_t src_stride, float* FI_RESTRICT dst,
                              int64_t dst_stride, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
#if !defined(__GNUC__) || defined(__clang__)
  block<float>(src, src_stride, dst, dst_stride, r0, r1, c0, c1);
#else
  using vf = Vec<8>::f;
  using vfu = Vec<8>::fu;
  using vi = Vec<8>::i;
  const int64_t r8 = r0 + (r1 - r0) / 8 * 8, c8 = c0 + (c1 - c0) / 8 * 8;
  auto block8 = [&](int64_t r, int64_t c) {
    vf v[8];
    for (int i = 0; i < 8; ++i) {
      v[i] = *reinterpret_cast<const vfu*>(src + (r + i) * src_stride + c);
    }
    vf t[8];
    for (int i = 0; i < 8; i += 2) {  // pairs of rows: interleave single values
      t[i] = __builtin_shuffle(v[i], v[i + 1], vi{0, 8, 2, 10, 4, 12, 6, 14});
      t[i + 1] = __builtin_shuffle(v[i], v[i + 1], vi{1, 9, 3, 11, 5, 13, 7, 15});
    }
    for (int i = 0; i < 8; i += 4) {  // then pairs of values
      for (int j = 0; j < 2; ++j) {
        v[i + j] = __builtin_shuffle(t[i + j], t[i + j + 2], vi{0, 1, 8, 9, 4, 5, 12, 13});
        v[i + j + 2] = __builtin_shuffle(t[i + j], t[i + j + 2], vi{2, 3, 10, 11, 6, 7, 14, 15});
      }
    }
    for (int j = 0; j < 4; ++j) {  // then halves
      t[j] = __builtin_shuffle(v[j], v[j + 4], vi{0, 1, 2, 3, 8, 9, 10, 11});
      t[j + 4] = __builtin_shuffle(v[j], v[j + 4], vi{4, 5, 6, 7, 12, 13, 14, 15});
    }
    for (int k = 0; k < 8; ++k) {  // t[k]: column c + k of the block's eight rows
      *reinterpret_cast<vfu*>(dst + (c + k) * dst_stride + r) = t[k];
    }
  };
  // The side with the longer stride (an NCHW map's planes, 16 KB or more apart at DeepFill v2's
  // and SN-PatchGAN's sizes: one L1 set) is walked eight rows at a time, in the outer loop.
  // Along the other side every plane of a channels-last row is live at once, and the half-lines
  // written into them evict each other before they are complete. In an ad-hoc timing (not
  // kept), the NCHW-writing gating's time beyond its channels-last form's fell by about half
  // with this order at 128 and 256 channels, by less at 96; at 24 to 64 channels the two orders
  // were within this machine's noise. The layout copy gained once its tasks also walked few
  // planes along many positions (layout_copy.cpp).
  if (dst_stride > src_stride) {
    for (int64_t c = c0; c < c8; c += 8) {
      for (int64_t r = r0; r < r8; r += 8) {
        block8(r, c);
      }
    }
  } else {
    for (int64_t r = r0; r < r8; r += 8) {
      for (int64_t c = c0; c < c8; c += 8) {
        block8(r, c);
      }
    }
  }
  if (c8 < c1) {
    block<float>(src, src_stride, dst, dst_stride, r0, r8, c8, c1);
  }
  if (r8 < r1) {
    block<float>(src, src_stride, dst, dst_stride, r8, r1, c0, c1);
  }
#endif
}

using F32Fn = void (*)(const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t, int64_t);
inline void f32_default(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t r0, int64_t r1,
                        int64_t c0, int64_t c1) {
  block_f32_body(src, src_stride, dst, dst_stride, r0, r1, c0, c1);
}
#if FI_X86_MULTIVERSION
FI_TARGET_V3 inline void f32_v3(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t r0,
                                int64_t r1, int64_t c0, int64_t c1) {
  block_f32_body(src, src_stride, dst, dst_stride, r0, r1, c0, c1);
}
FI_TARGET_V4 inline void f32_v4(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t r0,
                                int64_t r1, int64_t c0, int64_t c1) {
  block_f32_body(src, src_stride, dst, dst_stride, r0, r1, c0, c1);
}
#endif

// The float32 transposition for this CPU (FI_PICK_ISA).
inline F32Fn pick_f32() { return FI_PICK_ISA(f32); }

}  // namespace transpose
}  // namespace fastinpaint

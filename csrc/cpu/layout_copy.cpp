// A 4-d tensor copied between the NCHW and channels-last layouts, on the CPU: a helper of the
// cpu backend's convolutions (fastinpaint/ops/_cpu_conv.py), which run channels-last inside
// layers that take and give NCHW maps.
//
// Why not Tensor.contiguous(memory_format): torch's copy walks the output in order and reads
// the input with the stride of the other layout. From channels-last to NCHW it reads one value
// per cache line per channel, and once a map's rows no longer stay in cache (64 channels at
// 128x128) it re-reads each line once per channel: 5.5 ms for a 2x64x128x128 float32 map on a
// 2-thread Xeon, about 6x a plain copy (0.9 ms), where this one took 1.9 ms. Here each image is
// one (rows, cols) matrix transposed in blocks that stay in L1, whatever the direction.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "cpu_common.h"

namespace fastinpaint {
namespace {

constexpr int64_t kTile = 32;

// dst (cols, rows) = src (rows, cols)^T over rows [r0, r1) and columns [c0, c1) of one matrix,
// in kTile-column steps (a kTile x kTile tile of each stays in L1).
template <typename T>
void transpose_block(const T* FI_RESTRICT src, T* FI_RESTRICT dst, int64_t rows, int64_t cols, int64_t r0,
                     int64_t r1, int64_t c0, int64_t c1) {
  for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
    const int64_t t1 = std::min(c1, t0 + kTile);
    for (int64_t c = t0; c < t1; ++c) {
      T* d = dst + c * rows;
      for (int64_t r = r0; r < r1; ++r) {
        d[r] = src[r * cols + c];
      }
    }
  }
}

// The float32 form of transpose_block: 8x8 blocks transposed in registers (three rounds of
// two-vector shuffles), loaded and stored as rows of 8; the edges by the scalar loop. (GCC's
// __builtin_shuffle; other compilers take the scalar loop throughout.)
template <int Unused>
FI_INLINE void transpose_block_f32_body(const float* FI_RESTRICT src, float* FI_RESTRICT dst, int64_t rows,
                                        int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
#if !defined(__GNUC__) || defined(__clang__)
  transpose_block<float>(src, dst, rows, cols, r0, r1, c0, c1);
#else
  using vf = Vec<8>::f;
  using vfu = Vec<8>::fu;
  using vi = Vec<8>::i;
  const int64_t r8 = r0 + (r1 - r0) / 8 * 8, c8 = c0 + (c1 - c0) / 8 * 8;
  for (int64_t r = r0; r < r8; r += 8) {
    for (int64_t c = c0; c < c8; c += 8) {
      vf v[8];
      for (int i = 0; i < 8; ++i) {
        v[i] = *reinterpret_cast<const vfu*>(src + (r + i) * cols + c);
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
        *reinterpret_cast<vfu*>(dst + (c + k) * rows + r) = t[k];
      }
    }
  }
  if (c8 < c1) {
    transpose_block<float>(src, dst, rows, cols, r0, r8, c8, c1);
  }
  if (r8 < r1) {
    transpose_block<float>(src, dst, rows, cols, r8, r1, c0, c1);
  }
#endif
}

using TransposeF32Fn = void (*)(const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
void transpose_f32_default(const float* src, float* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                           int64_t c0, int64_t c1) {
  transpose_block_f32_body<0>(src, dst, rows, cols, r0, r1, c0, c1);
}
#if FI_X86_MULTIVERSION
FI_TARGET_V3 void transpose_f32_v3(const float* src, float* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                                   int64_t c0, int64_t c1) {
  transpose_block_f32_body<0>(src, dst, rows, cols, r0, r1, c0, c1);
}
FI_TARGET_V4 void transpose_f32_v4(const float* src, float* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                                   int64_t c0, int64_t c1) {
  transpose_block_f32_body<0>(src, dst, rows, cols, r0, r1, c0, c1);
}
#endif

// Every matrix of a (matrices, rows, cols) buffer transposed; one task per block of kTile rows
// and up to kBlockCols columns (a map of few channels has one row tile: its columns split it).
template <typename T, typename Block>
void transpose_all(const T* src, T* dst, int64_t matrices, int64_t rows, int64_t cols, Block block) {
  constexpr int64_t kBlockCols = 32 * kTile;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_blocks = (cols + kBlockCols - 1) / kBlockCols;
  const int64_t per_matrix = row_tiles * col_blocks;
  parallel_for(0, matrices * per_matrix, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / per_matrix, r0 = (t % per_matrix) / col_blocks * kTile;
      const int64_t c0 = (t % col_blocks) * kBlockCols;
      block(src + m * rows * cols, dst + m * rows * cols, rows, cols, r0, std::min(rows, r0 + kTile), c0,
            std::min(cols, c0 + kBlockCols));
    }
  });
}

at::Tensor layout_copy_cpu(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() == 4, "layout_copy: x must be (B, C, H, W), got ", x.dim(), " dimensions");
  const at::MemoryFormat want = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::MemoryFormat other = channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  const int64_t esize = x.element_size();
  // only a dense map in the other layout is transposed here; anything else is torch's copy
  if (!x.is_contiguous(other) || x.is_contiguous(want) || x.numel() == 0 || (esize != 2 && esize != 4 && esize != 8)) {
    return x.is_contiguous(want) ? x.clone(want) : x.contiguous(want);
  }
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(want));
  // NCHW -> channels-last: each image's (C, HW) matrix transposed; the other way (HW, C)
  const int64_t rows = channels_last ? C : HW, cols = channels_last ? HW : C;
  const void* src = x.data_ptr();
  void* dst = out.data_ptr();
  if (esize == 4) {   // any 4-byte type, moved as float32 bits
    transpose_all(static_cast<const float*>(src), static_cast<float*>(dst), B, rows, cols, FI_PICK_ISA(transpose_f32));
  } else if (esize == 8) {
    transpose_all(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), B, rows, cols,
                  &transpose_block<uint64_t>);
  } else {
    transpose_all(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), B, rows, cols,
                  &transpose_block<uint16_t>);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) { m.impl("layout_copy", &layout_copy_cpu); }

}  // namespace fastinpaint

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
#include "layout_copy.h"
#include "transpose.h"

namespace fastinpaint {
namespace {

// Every matrix of a (matrices, rows, cols) buffer transposed. To NCHW (rows: the positions,
// more than the channels) a task is kPlaneRows positions of kPlanes planes, written eight planes
// at a time along the positions (transpose.h), so that few write streams are live and each runs
// long (at 2x64x128x128 tasks of 32 positions over every plane took 1.6-2.1x the time of a
// plain copy, these 1.0-1.1x, in ad-hoc timings not kept; the gating's NCHW kernel, tried so,
// was the slower: gated_conv.cpp keeps tiles of 64 positions over every channel); to
// channels-last a task is kTile rows and up to kBlockCols columns (a map of few channels has one
// row tile: its columns split it).
template <typename T, typename Block>
void transpose_all(const T* src, T* dst, int64_t matrices, int64_t rows, int64_t cols, Block block) {
  constexpr int64_t kTile = transpose::kTile, kBlockCols = 32 * kTile, kPlaneRows = 1024, kPlanes = 16;
  const bool to_planes = rows > cols;
  const int64_t tile_rows = to_planes ? kPlaneRows : kTile, tile_cols = to_planes ? kPlanes : kBlockCols;
  const int64_t row_tiles = (rows + tile_rows - 1) / tile_rows, col_blocks = (cols + tile_cols - 1) / tile_cols;
  const int64_t per_matrix = row_tiles * col_blocks;
  parallel_for(0, matrices * per_matrix, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / per_matrix, r0 = (t % per_matrix) / col_blocks * tile_rows;
      const int64_t c0 = (t % col_blocks) * tile_cols;
      block(src + m * rows * cols, cols, dst + m * rows * cols, rows, r0, std::min(rows, r0 + tile_rows), c0,
            std::min(cols, c0 + tile_cols));
    }
  });
}

}  // namespace

at::Tensor layout_copy(const at::Tensor& x, bool channels_last) {
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
    transpose_all(static_cast<const float*>(src), static_cast<float*>(dst), B, rows, cols, transpose::pick_f32());
  } else if (esize == 8) {
    transpose_all(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), B, rows, cols,
                  &transpose::block<uint64_t>);
  } else {
    transpose_all(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), B, rows, cols,
                  &transpose::block<uint16_t>);
  }
  return out;
}

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) { m.impl("layout_copy", &layout_copy); }

}  // namespace fastinpaint

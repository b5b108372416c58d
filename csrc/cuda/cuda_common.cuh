// Shared helpers for fastinpaint's CUDA kernels (csrc/cuda/*.cu):
//   * the accurate (no fast math) exp / expm1 overloaded for the accumulation types;
//   * one grid-size rule for the grid-stride elementwise kernels (grid_for: enough blocks to
//     fill the device once, never more than the work needs);
//   * the index type of a launch (with_index_type): 32-bit, with at::cuda's fast divider
//     (IntDivider<uint32_t>: a multiply-high and a shift instead of a 64-bit division), when
//     every index the kernel forms fits, else 64-bit.
#pragma once

#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastinpaint {

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float expm1_(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_(double x) { return expm1(x); }

// Threads of the elementwise kernels' blocks.
constexpr int kElementwiseThreads = 256;

// Threads the current device keeps resident (SMs x max threads per SM), cached per
// device. Plain device attributes rather than at::cuda::getCurrentDeviceProperties():
// ATen/cuda/CUDAContext.h needs the cuBLAS / cuSPARSE headers, which a bare toolkit lacks.
inline int64_t resident_threads() {
  static std::atomic<int64_t> cache[C10_COMPILE_TIME_MAX_GPUS] = {};
  const c10::DeviceIndex device = c10::cuda::current_device();
  TORCH_INTERNAL_ASSERT(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS);
  int64_t value = cache[device].load(std::memory_order_relaxed);
  if (value == 0) {
    int sms = 0, threads_per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm,
                                          cudaDevAttrMaxThreadsPerMultiProcessor, device));
    value = static_cast<int64_t>(sms) * threads_per_sm;
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Blocks of `threads` for a grid-stride loop over work_items: enough to fill the device
// once (every resident thread busy), fewer when the work is smaller.
inline int64_t grid_for(int64_t work_items, int threads = kElementwiseThreads) {
  const int64_t resident_blocks = std::max<int64_t>(1, resident_threads() / threads);
  const int64_t needed = (work_items + threads - 1) / threads;
  return std::max<int64_t>(1, std::min(needed, resident_blocks));
}

// Calls fn(index_t{}) with uint32_t when max_index (the largest index or dividend the kernel
// forms, including k + grid stride) fits in int32, else with int64_t. Kernels built on
// at::cuda::detail::IntDivider<index_t> then divide in 32 bits wherever they can.
template <typename Fn>
void with_index_type(int64_t max_index, Fn&& fn) {
  if (max_index <= static_cast<int64_t>(std::numeric_limits<int32_t>::max())) {
    fn(uint32_t{});
  } else {
    fn(int64_t{});
  }
}

template <typename index_t>
using Divider = at::cuda::detail::IntDivider<index_t>;

}  // namespace fastinpaint

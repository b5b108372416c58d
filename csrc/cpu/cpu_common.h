// Shared helpers for fastinpaint's CPU kernels (csrc/cpu/*.cpp): forced inlining, the
// dtype dispatch of the elementwise loops, the one parallel loop every kernel uses
// (parallel_for), and the run-time ISA level that picks among the hot loops compiled for
// x86-64 (baseline), x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/Version.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FI_X86_MULTIVERSION 1
#define FI_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define FI_TARGET_V4 __attribute__((target("arch=x86-64-v4,prefer-vector-width=512")))
#else
#define FI_X86_MULTIVERSION 0
#endif

#if defined(__GNUC__)
#define FI_INLINE inline __attribute__((always_inline))
#define FI_RESTRICT __restrict__
#else
#define FI_INLINE inline
#define FI_RESTRICT
#endif

namespace fastinpaint {

// The chunk numbers 0, 1, ... that parallel_for (below) iterates over, and the byte tensor it
// names as the iterator's output (never written), made once for every chunk count up to
// kMaxChunks. Made per call (an arange and an empty tensor), they cost a few microseconds each
// time: in a profile of DeepFill v2's training step at 128x128, 674 calls and several
// milliseconds. Read-only after construction, so shared by every thread; never freed (a static
// tensor's destructor could run after libtorch's own teardown).
struct ChunkIds {
  static constexpr int64_t kMaxChunks = 256;  // more threads than this: a fresh arange per call
  std::vector<at::Tensor> ids;                 // ids[n]: int64 [0, n)
  std::vector<at::Tensor> sink;                // sink[n]: n bytes
};
inline const ChunkIds& chunk_ids() {
  static const ChunkIds* cached = [] {
    // ordinary tensors whatever mode the first call ran in (they never reach the dispatcher
    // again: TensorIterator reads them directly)
    const c10::InferenceMode normal_tensors(/*enabled=*/false);
    auto* c = new ChunkIds;
    const at::Tensor ids = at::arange(ChunkIds::kMaxChunks, at::TensorOptions().dtype(at::kLong));
    const at::Tensor sink = at::empty({ChunkIds::kMaxChunks}, at::TensorOptions().dtype(at::kByte));
    for (int64_t n = 0; n <= ChunkIds::kMaxChunks; ++n) {
      c->ids.push_back(ids.narrow(0, 0, n));
      c->sink.push_back(sink.narrow(0, 0, n));
    }
    return c;
  }();
  return *cached;
}

// fastinpaint's one parallel loop: at::parallel_for's contract (fn(b, e) over disjoint
// [b, e) covering [begin, end), chunks of at least `grain` elements, serial when the range
// is small, torch runs one thread, or the caller is already inside a parallel region), run
// on torch's intra-op threads (at::get_num_threads(), set by torch.set_num_threads).
//
// Why not at::parallel_for itself: with torch's OpenMP backend its body is a
// `#pragma omp parallel` in the header, which compiles to a serial loop in an extension
// built without -fopenmp (and -fopenmp would tie the build to the compiler's own OpenMP
// runtime). TensorIterator::for_each is at::parallel_for as compiled inside libtorch, so
// the loop below runs on torch's own thread pool whatever the compiler and the backend:
// one task per chunk, at most one chunk per thread. (channel_fc.cpp's elementwise passes,
// over operands of any strides and a broadcast bias, call TensorIterator::for_each
// directly: the same compiled loop, with TensorIterator's own dimension coalescing.)
// Each task runs with the caller's
// thread-local state (dispatch keys, grad mode, ...): an ATen op inside a task (the
// pixel-attention block products) dispatches as it would on the calling thread, below
// autograd, instead of recording a graph on a pool thread.
template <typename Fn>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const int64_t n = end - begin;
  if (n <= 0) {
    return;
  }
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = at::get_num_threads();
  if (n <= grain || threads <= 1 || at::in_parallel_region()) {
    fn(begin, end);
    return;
  }
  const int64_t wanted = std::min<int64_t>(threads, (n + grain - 1) / grain);
  const int64_t size = (n + wanted - 1) / wanted;
  const int64_t chunks = (n + size - 1) / size;  // every chunk non-empty (33 in 8 chunks of 5: 7 chunks)
  const at::ThreadLocalState caller;
  const ChunkIds& cached = chunk_ids();
  const bool use_cached = chunks <= ChunkIds::kMaxChunks;
  const at::Tensor ids = use_cached ? cached.ids[chunks] : at::arange(chunks, at::TensorOptions().dtype(at::kLong));
  const at::Tensor sink = use_cached ? cached.sink[chunks] : at::empty({chunks}, at::TensorOptions().dtype(at::kByte));
  at::TensorIteratorConfig config;
  config.set_check_mem_overlap(false).check_all_same_dtype(false).resize_outputs(false);
  config.add_output(sink).add_const_input(ids);
  at::TensorIterator iter = config.build();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
        for (int64_t o = 0; o < size1; ++o) {
          const char* base = data[1] + o * strides[3];
          for (int64_t i = 0; i < size0; ++i) {
            const int64_t chunk = *reinterpret_cast<const int64_t*>(base + i * strides[1]);
            const int64_t b = begin + chunk * size;
            const at::ThreadLocalStateGuard state(caller);
            fn(b, std::min(end, b + size));
          }
        }
      },
      /*grain_size=*/1);
}

// GCC vector types of L lanes (a vector_size that depends on a template parameter is ignored,
// so each width is spelt out): f float, u / i 32-bit ints; fu, uu the same at any 4-byte
// alignment (for loads from memory that is not aligned to the vector).
template <int L>
struct Vec;
#define FI_VEC_TYPES(L)                                                   \
  template <>                                                             \
  struct Vec<L> {                                                         \
    typedef float f __attribute__((vector_size(4 * L)));                  \
    typedef float fu __attribute__((vector_size(4 * L), aligned(4)));     \
    typedef uint32_t u __attribute__((vector_size(4 * L)));               \
    typedef uint32_t uu __attribute__((vector_size(4 * L), aligned(4)));  \
    typedef int32_t i __attribute__((vector_size(4 * L)));                \
  };
FI_VEC_TYPES(4)
FI_VEC_TYPES(8)
FI_VEC_TYPES(16)
#undef FI_VEC_TYPES

// Calls fn(T{}) for the (checked) floating dtype st.
template <typename Fn>
void dispatch_dtype(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "fastinpaint: unsupported dtype ", st);
  }
}

#if FI_X86_MULTIVERSION
// 0 baseline, 1 x86-64-v3, 2 x86-64-v4: what the CPU (and OS) supports, capped by torch's
// CPU capability so that ATEN_CPU_CAPABILITY=default / avx2 also selects our lower paths.
inline int detect_isa_level() {
  __builtin_cpu_init();
  int level = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("f16c")) {
    level = 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512cd")) {
      level = 2;
    }
  }
  const std::string cap = at::get_cpu_capability();
  int torch_level = 0;
  if (cap.find("AVX512") != std::string::npos) {
    torch_level = 2;
  } else if (cap.find("AVX2") != std::string::npos) {
    torch_level = 1;
  }
  return std::min(level, torch_level);
}

// detect_isa_level(), computed once per process.
inline int isa_level() {
  static const int level = detect_isa_level();
  return level;
}

// The build of a hot loop that isa_level() allows, among its baseline, x86-64-v3 and v4 ones.
template <typename Fn>
Fn pick_by_isa(Fn baseline, Fn v3, Fn v4) {
  const int level = isa_level();
  return level == 2 ? v4 : (level == 1 ? v3 : baseline);
}
// FI_PICK_ISA(name): name_default, name_v3 or name_v4 (name_default alone without multiversioning);
// FI_PICK_ISA_T(name, template arguments...): the same of function templates.
#define FI_PICK_ISA(name) ::fastinpaint::pick_by_isa(&name##_default, &name##_v3, &name##_v4)
#define FI_PICK_ISA_T(name, ...) \
  ::fastinpaint::pick_by_isa(&name##_default<__VA_ARGS__>, &name##_v3<__VA_ARGS__>, &name##_v4<__VA_ARGS__>)
#else
#define FI_PICK_ISA(name) (&name##_default)
#define FI_PICK_ISA_T(name, ...) (&name##_default<__VA_ARGS__>)
#endif  // FI_X86_MULTIVERSION

}  // namespace fastinpaint

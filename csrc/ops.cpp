// The fastinpaint library's housekeeping ops (debug poisoning, build info, the parallel
// loop's thread count).
//
// The kernels' schemas are not here: each op declares its kernels once, in Python
// (fastinpaint/ops/<op>/op.py, through fastinpaint/ops/_registry.py), and that one schema
// serves both the C++ op `fastinpaint::<name>`, whose kernels csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu register with TORCH_LIBRARY_IMPL, and its Triton twin
// `fastinpaint::<name>_triton`. `import fastinpaint` defines the schemas before it loads
// this library, and the dispatcher checks each kernel's C++ signature against its schema
// when the kernel registers.
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "common.h"
#include "cpu/cpu_common.h"

namespace fastinpaint {

namespace {
std::atomic<bool> g_debug_poison{false};

void set_debug_poison(bool enabled) { g_debug_poison.store(enabled); }

#ifdef FASTINPAINT_WITH_CUDA
#define FASTINPAINT_CUDA_FLAG "1"
#else
#define FASTINPAINT_CUDA_FLAG "0"
#endif

// The torch version this library was compiled against. The loader reads this marker
// from the file's bytes *before* loading it, to refuse a prebuilt binary built
// against another torch (fastinpaint/_extension.py).
__attribute__((used)) const char kBuildInfo[] =
    "fastinpaint-build-info:torch=" TORCH_VERSION ";cuda=" FASTINPAINT_CUDA_FLAG ";";

std::string build_info() { return kBuildInfo; }

// How many distinct threads run the chunks of parallel_for(0, n, grain): the test that the
// CPU kernels' one parallel loop really uses torch's threads (tests/test_backend.py).
int64_t parallel_threads(int64_t n, int64_t grain) {
  std::mutex lock;
  std::set<std::thread::id> seen;
  parallel_for(0, n, grain, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(lock);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

bool has_cuda_kernels() {
#ifdef FASTINPAINT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

bool debug_poison() { return g_debug_poison.load(std::memory_order_relaxed); }

TORCH_LIBRARY(fastinpaint, m) {
  // housekeeping
  m.def("_set_debug_poison(bool enabled) -> ()", &set_debug_poison);
  m.def("_build_info() -> str", &build_info);
  m.def("_has_cuda_kernels() -> bool", &has_cuda_kernels);
  m.def("_parallel_threads(int n, int grain) -> int", &parallel_threads);
}

}  // namespace fastinpaint

// No Python entry point: the library is loaded with torch.ops.load_library
// (fastinpaint/_extension.py), so building it needs no Python headers.

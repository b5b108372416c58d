// Shared helpers for fastinpaint's CPU kernels (csrc/cpu/*.cpp): forced inlining, the
// dtype dispatch of the elementwise loops, and the run-time ISA level that picks among the
// hot loops compiled for x86-64 (baseline), x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <string>

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
#endif  // FI_X86_MULTIVERSION

}  // namespace fastinpaint

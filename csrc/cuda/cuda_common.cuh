// Shared device helpers for fastinpaint's CUDA kernels (csrc/cuda/*.cu): the accurate
// (no fast math) exp / expm1 overloaded for the accumulation types float and double.
#pragma once

namespace fastinpaint {

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float expm1_(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_(double x) { return expm1(x); }

}  // namespace fastinpaint

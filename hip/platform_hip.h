// HIP (ROCm) spellings of the platform vocabulary (see cpp/platform.h). The build hipifies cpp/
// into the build tree and puts this directory first on the include path, so cpp/platform.h picks
// this header up on AMD. Written by hand: hipify cannot produce memory scopes, uncached
// allocation or 64-wide wavefront code from the CUDA spellings.
#pragma once

#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>

#include <cstdint>
#include <utility>

#define ARMS_HOST_DEVICE __host__ __device__
#define ARMS_BACKEND_NAME "hip"

namespace arms {
namespace platform {

// CDNA parts (gfx90a, gfx94x, gfx950) run 64-wide wavefronts. __AMDGCN_WAVEFRONT_SIZE is only
// defined in the device pass; the host pass sizes blocks in multiples of 64, which also suits a
// wave32 device.
#if defined(__AMDGCN_WAVEFRONT_SIZE)
constexpr int kWarpSize = __AMDGCN_WAVEFRONT_SIZE;
#else
constexpr int kWarpSize = 64;
#endif

using Stream = hipStream_t;
using Error = hipError_t;
constexpr Error kSuccess = hipSuccess;
inline const char* error_string(Error e) { return hipGetErrorString(e); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor(v, offset);
  return v;
}

// Read a value another kernel on this device wrote (device-scope, never a stale cache line).
__device__ __forceinline__ uint32_t load_l2(const uint32_t* p) {
#if __has_builtin(__hip_atomic_load)
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
  return __atomic_load_n(p, __ATOMIC_RELAXED);
#endif
}

// Value of `v` in lane `src` of this wavefront.
__device__ __forceinline__ float warp_shfl(float v, int src) { return __shfl(v, src); }
__device__ __forceinline__ float warp_shfl_xor(float v, int mask) { return __shfl_xor(v, mask); }

// System-scope relaxed atomics: the load is re-issued to memory on every spin iteration and sees
// writes that peers make over xGMI/PCIe into fine-grained memory.
__device__ __forceinline__ uint32_t load_relaxed_sys(const uint32_t* p) {
#if __has_builtin(__hip_atomic_load)
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
  return __atomic_load_n(p, __ATOMIC_RELAXED);  // clang's AMDGPU default scope is system
#endif
}
__device__ __forceinline__ void store_relaxed_sys(uint32_t* p, uint32_t v) {
#if __has_builtin(__hip_atomic_store)
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
  __atomic_store_n(p, v, __ATOMIC_RELAXED);
#endif
}
__device__ __forceinline__ void fence_system() { __threadfence_system(); }

// 64-bit value+flag packets (cpp/lamport.cuh): one aligned 64-bit system-scope access each, so
// the flag and the value of a packet are seen together. The x2 forms are two such packets.
__device__ __forceinline__ void store_relaxed_sys_u64(uint64_t* p, uint64_t v) {
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ uint64_t load_relaxed_sys_u64(const uint64_t* p) {
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ void store_relaxed_sys_u64x2(uint64_t* p, uint64_t a, uint64_t b) {
  store_relaxed_sys_u64(p, a);
  store_relaxed_sys_u64(p + 1, b);
}
__device__ __forceinline__ void load_relaxed_sys_u64x2(const uint64_t* p, uint64_t& a, uint64_t& b) {
  a = load_relaxed_sys_u64(p);
  b = load_relaxed_sys_u64(p + 1);
}

// The epoch advance: an acquire load of the control words, a device-scope relaxed add, and the
// acquire load that reads the count.
__device__ __forceinline__ uint64_t load_acquire_gpu_u64(const void* p) {
  return __hip_atomic_load(static_cast<const uint64_t*>(p), __ATOMIC_ACQUIRE, __HIP_MEMORY_SCOPE_AGENT);
}
__device__ __forceinline__ void red_add_relaxed_gpu(uint32_t* p, uint32_t v) {
  __hip_atomic_fetch_add(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
}
__device__ __forceinline__ uint64_t load_relaxed_gpu_u64(const void* p) {
  return __hip_atomic_load(static_cast<const uint64_t*>(p), __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
}
__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* p) {
  return __hip_atomic_load(p, __ATOMIC_ACQUIRE, __HIP_MEMORY_SCOPE_AGENT);
}

// s_memrealtime counts at a constant 100 MHz on CDNA parts.
__device__ __forceinline__ uint64_t timer_ns() { return __builtin_amdgcn_s_memrealtime() * 10ull; }

// HIP has no programmatic dependent launch: stream order alone separates kernels.
__device__ __forceinline__ void pdl_wait() {}
__device__ __forceinline__ void pdl_trigger() {}

__device__ __forceinline__ float half_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ uint16_t float_to_half(float f) { return __half_as_ushort(__float2half(f)); }

// Memory that other GPUs write and this GPU polls must be fine-grained (uncached): coarse-grained
// memory may keep a stale line in this GPU's L2 while the peer's write sits in HBM.
inline Error alloc_polled(void** p, size_t bytes) {
#if defined(hipDeviceMallocUncached)
  return hipExtMallocWithFlags(p, bytes, hipDeviceMallocUncached);
#else
  return hipExtMallocWithFlags(p, bytes, hipDeviceMallocFinegrained);
#endif
}
inline Error free_polled(void* p) { return hipFree(p); }

inline bool device_supports_pdl(int) { return false; }

template <class... KernelArgs, class... Args>
inline Error launch(void (*kernel)(KernelArgs...), unsigned grid, unsigned block, Stream stream, bool,
                    Args&&... args) {
  hipLaunchKernelGGL(kernel, dim3(grid), dim3(block), 0, stream, std::forward<Args>(args)...);
  return hipGetLastError();
}

}  // namespace platform
}  // namespace arms

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

// The backend targets CDNA (gfx9: gfx90a MI200, gfx942 MI300, gfx950 MI350), whose wavefronts
// are always 64 wide, so kWarpSize is the constant 64 in the host and the device pass alike: the
// host sizes blocks and the backend table reports warp_size() with the same number the kernels
// use for lane mapping and reductions. (Clang 21 deprecates __AMDGCN_WAVEFRONT_SIZE, the old
// compile-time spelling, and RDNA parts run wave32 by default: they are refused below instead of
// being compiled with a lane mapping that would not match their hardware.)
#if defined(__HIP_DEVICE_COMPILE__) && !defined(__GFX9__)
#error "allreduce-rms: the HIP backend supports CDNA (gfx9) targets only: set ALLREDUCE_RMS_HIP_ARCHS to gfx90a, gfx942 and/or gfx950"
#endif
constexpr int kWarpSize = 64;

using Stream = hipStream_t;
using Error = hipError_t;
constexpr Error kSuccess = hipSuccess;
inline const char* error_string(Error e) { return hipGetErrorString(e); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor(v, offset);
  return v;
}

// Read a value another kernel on this device wrote (device scope: never a stale L1 line).
__device__ __forceinline__ uint32_t load_l2(const uint32_t* p) {
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
}

// Value of `v` in lane `src` of this wavefront.
__device__ __forceinline__ float warp_shfl(float v, int src) { return __shfl(v, src); }
__device__ __forceinline__ float warp_shfl_xor(float v, int mask) { return __shfl_xor(v, mask); }

// System-scope relaxed atomics: the load is re-issued to memory on every spin iteration and sees
// writes that peers make over xGMI/PCIe into fine-grained memory. On gfx942/gfx950 clang emits
// global_load/global_store with sc0 sc1 (system coherence: never a stale L1 or non-local L2
// line); on gfx90a, a glc load and a plain store, which fine-grained memory writes through.
// No fences: each cell (or packet) is its own flag.
__device__ __forceinline__ uint32_t load_relaxed_sys(const uint32_t* p) {
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ void store_relaxed_sys(uint32_t* p, uint32_t v) {
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}

// The same for one 8-byte value+flag packet (cpp/lamport.cuh; p 8-byte aligned): a single
// global_load_dwordx2 / global_store_dwordx2, which the AMDGPU memory model treats as single-copy
// atomic, so a reader sees either the old packet or the whole new one, never a new flag with an
// old value. The x2 forms are two such packets, each atomic on its own (there is no 16-byte
// single-copy-atomic access: each 8-byte half must carry its own flag).
__device__ __forceinline__ uint64_t load_relaxed_sys_u64(const uint64_t* p) {
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ void store_relaxed_sys_u64(uint64_t* p, uint64_t v) {
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ void store_relaxed_sys_u64x2(uint64_t* p, uint64_t a, uint64_t b) {
  store_relaxed_sys_u64(p, a);
  store_relaxed_sys_u64(p + 1, b);
}
__device__ __forceinline__ void load_relaxed_sys_u64x2(const uint64_t* p, uint64_t& a, uint64_t& b) {
  a = load_relaxed_sys_u64(p);
  b = load_relaxed_sys_u64(p + 1);
}

__device__ __forceinline__ void fence_system() { __threadfence_system(); }

// s_memrealtime counts at a constant 100 MHz on CDNA parts.
__device__ __forceinline__ uint64_t timer_ns() { return __builtin_amdgcn_s_memrealtime() * 10ull; }

// HIP has no programmatic dependent launch: stream order alone separates kernels.
__device__ __forceinline__ void pdl_wait() {}
__device__ __forceinline__ void pdl_trigger() {}

// No L2 prefetch without a load on AMD: the norm kernel's prefill prefetch is a no-op here.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  (void)p;
  (void)bytes;
}

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

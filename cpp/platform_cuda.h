// CUDA spellings of the platform vocabulary (see platform.h). PTX lives here and nowhere else.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#define ARMS_HOST_DEVICE __host__ __device__
#define ARMS_BACKEND_NAME "cuda"

namespace arms {
namespace platform {

constexpr int kWarpSize = 32;

using Stream = cudaStream_t;
using Error = cudaError_t;
constexpr Error kSuccess = cudaSuccess;
inline const char* error_string(Error e) { return cudaGetErrorString(e); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Read a value another kernel on this device wrote: bypass L1, which is not coherent with
// writes made by blocks on other SMs (a PDL-launched kernel may share an SM with the writer).
// A plain load the compiler may schedule freely, unlike the asm loads below.
__device__ __forceinline__ uint32_t load_l2(const uint32_t* p) { return __ldcg(p); }

// Value of `v` in lane `src` of this warp.
__device__ __forceinline__ float warp_shfl(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ float warp_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// ld/st.relaxed.sys: never served from a stale L1 line, and ordered with respect to other
// system-scope operations on the same address. That is all the Lamport cells need, because every
// cell is its own flag.
__device__ __forceinline__ uint32_t load_relaxed_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_relaxed_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void fence_system() { __threadfence_system(); }

// 64-bit value+flag packets (lamport.cuh). An aligned 64-bit access is single-copy atomic, so a
// reader that sees the flag half of a packet sees the value half written with it; a .v2 access
// is two such packets, each atomic on its own.
__device__ __forceinline__ void store_relaxed_sys_u64(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint64_t load_relaxed_sys_u64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_relaxed_sys_u64x2(uint64_t* p, uint64_t a, uint64_t b) {
  asm volatile("st.relaxed.sys.global.v2.u64 [%0], {%1, %2};" ::"l"(p), "l"(a), "l"(b) : "memory");
}
__device__ __forceinline__ void load_relaxed_sys_u64x2(const uint64_t* p, uint64_t& a, uint64_t& b) {
  asm volatile("ld.relaxed.sys.global.v2.u64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}

__device__ __forceinline__ uint64_t timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Programmatic dependent launch (sm_90+). pdl_wait() blocks until the previous kernel in the
// stream has completed and its memory is visible; pdl_trigger() lets the next kernel be scheduled
// early (it still stops at its own pdl_wait()). Both are no-ops when the launch had no PDL edge.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Ask L2 to fetch [p, p + bytes) from memory, without waiting and without registers: rows a block
// will load later are then L2 hits (the norm kernel's prefill pipeline). sm_90's bulk prefetch
// wants p and bytes multiples of 16 (the caller's vector path guarantees both); elsewhere a no-op.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(__cvta_generic_to_global(p)), "r"(bytes) : "memory");
#else
  (void)p;
  (void)bytes;
#endif
}

// float -> bf16 (round to nearest even) in one cvt instruction on sm_80+. ncu showed the norm
// kernel issue-limited at large T; the portable bit-twiddling version in platform.h costs ~6
// integer instructions per element. NaN stays NaN (canonical 0x7fff instead of a quieted copy).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ARMS_NATIVE_FLOAT_TO_BF16 1
__device__ __forceinline__ uint16_t native_float_to_bf16(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
#endif

__device__ __forceinline__ float half_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ uint16_t float_to_half(float f) { return __half_as_ushort(__float2half_rn(f)); }

// Peers write into this memory over NVLink/PCIe and this GPU polls it: plain device memory is
// coherent enough on NVIDIA when the polls use .sys-scope loads.
inline Error alloc_polled(void** p, size_t bytes) { return cudaMalloc(p, bytes); }
inline Error free_polled(void* p) { return cudaFree(p); }

// True when kernels on this device may use programmatic dependent launch.
inline bool device_supports_pdl(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 9;
}

template <class... KernelArgs, class... Args>
inline Error launch(void (*kernel)(KernelArgs...), unsigned grid, unsigned block, Stream stream, bool pdl,
                    Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace platform
}  // namespace arms

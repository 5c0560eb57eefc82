// The platform layer: the only file that knows CUDA from HIP.
//
// Kernel and host sources include this header and nothing vendor-specific. Each vendor header
// provides the same small vocabulary, in namespace arms::platform:
//   kWarpSize                      threads per warp (32) or wavefront (64), a compile-time constant
//   warp_sum(float)                butterfly sum over the whole warp/wavefront
//   warp_shfl / warp_shfl_xor      a lane's value, by lane or by xor of the lane index
//   load_relaxed_sys / store_relaxed_sys
//                                  32-bit accesses that bypass non-coherent caches and are visible
//                                  to other GPUs (the failure word, polled during a wait; the
//                                  store and warp_sum have no user in the kernels today)
//   load_relaxed_sys_u64(x2) / store_relaxed_sys_u64(x2)
//                                  the same for one (two) 64-bit value+flag packets, each access
//                                  single-copy atomic
//   load_l2(p)                     a 32-bit read that bypasses L1, of a value another kernel on this
//                                  GPU wrote (the epoch cells, the failure word)
//   fence_system()                 order earlier writes before later ones for every observer
//   timer_ns()                     a device clock in nanoseconds, for bounded spins
//   pdl_wait() / pdl_trigger()     programmatic dependent launch (no-ops where unsupported)
//   prefetch_l2(p, bytes)          fetch bytes into L2 without waiting (a no-op where unsupported)
//   half_to_float / float_to_half  fp16 bit-pattern conversions
//   native_float_to_bf16           (optional, with ARMS_NATIVE_FLOAT_TO_BF16) a one-instruction
//                                  float -> bf16 that float_to_bf16 below prefers
//   alloc_polled / free_polled     device memory that peers write and this GPU polls
//   launch(kernel, grid, block, stream, pdl, args...)
//                                  one kernel launch with the launch attributes the vendor supports
#pragma once

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIP__)
#include "platform_hip.h"
#else
#include "platform_cuda.h"
#endif

#include <cstdint>
#include <cstring>

namespace arms {
namespace platform {

// bf16 is the top half of an fp32 bit pattern: the conversions are exact bit operations and need
// no vendor type (Debian's HIP 5.2, for one, has no hip_bf16.h).
ARMS_HOST_DEVICE inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as torch does; NaN stays a (quiet) NaN.
ARMS_HOST_DEVICE inline uint16_t float_to_bf16(float f) {
#if defined(ARMS_NATIVE_FLOAT_TO_BF16)
  return native_float_to_bf16(f);  // device pass only, where the vendor has an instruction
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
#endif
}

}  // namespace platform
}  // namespace arms

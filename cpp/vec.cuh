// Element types and a small vector type, so kernel bodies read as math.
//
// Vec<D, N> holds N elements of dtype D in their storage form and moves them with 16-byte
// accesses whenever N elements fill whole 16-byte words; the caller guarantees the alignment
// (the host launcher picks N = 1 when a pointer or stride is not aligned).
#pragma once

#include "backend_api.h"
#include "platform.h"

namespace arms {

struct F32 {
  using storage = float;
  static constexpr int code = ARMS_F32;
  __device__ static float to_float(storage v) { return v; }
  __device__ static storage from_float(float f) { return f; }
};

struct F16 {
  using storage = uint16_t;
  static constexpr int code = ARMS_F16;
  __device__ static float to_float(storage v) { return platform::half_to_float(v); }
  __device__ static storage from_float(float f) { return platform::float_to_half(f); }
};

struct BF16 {
  using storage = uint16_t;
  static constexpr int code = ARMS_BF16;
  __device__ static float to_float(storage v) { return platform::bf16_to_float(v); }
  __device__ static storage from_float(float f) { return platform::float_to_bf16(f); }
};

template <class D, int N>
struct alignas(sizeof(typename D::storage) * N % 16 == 0 ? 16 : sizeof(typename D::storage)) Vec {
  using S = typename D::storage;
  static constexpr int kBytes = sizeof(S) * N;
  static constexpr bool kWide = kBytes % 16 == 0;
  S v[N];

  __device__ __forceinline__ void load(const S* p) {
    if constexpr (kWide) {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) reinterpret_cast<uint4*>(v)[i] = reinterpret_cast<const uint4*>(p)[i];
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = p[i];
    }
  }
  __device__ __forceinline__ void store(S* p) const {
    if constexpr (kWide) {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(v)[i];
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) p[i] = v[i];
    }
  }
  __device__ __forceinline__ float get(int i) const { return D::to_float(v[i]); }
  __device__ __forceinline__ void set(int i, float f) { v[i] = D::from_float(f); }
  __device__ __forceinline__ float sum_of_squares() const {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) s = fmaf(get(i), get(i), s);
    return s;
  }
};

template <class D, int N>
__device__ __forceinline__ void load_as_float(const void* base, int64_t element, float out[N]) {
  Vec<D, N> v;
  v.load(static_cast<const typename D::storage*>(base) + element);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = v.get(i);
}

// Weights may have any of the three dtypes, independent of the activations: one uniform branch.
template <int N>
__device__ __forceinline__ void load_weight(const void* base, int dtype, int64_t element, float out[N]) {
  if (dtype == ARMS_BF16) {
    load_as_float<BF16, N>(base, element, out);
  } else if (dtype == ARMS_F16) {
    load_as_float<F16, N>(base, element, out);
  } else {
    load_as_float<F32, N>(base, element, out);
  }
}

__device__ __forceinline__ uint32_t float_bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float bits_float(uint32_t u) { return __uint_as_float(u); }

}  // namespace arms

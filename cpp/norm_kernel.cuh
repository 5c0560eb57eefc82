// The one normalization kernel, over a list of (at most two) column segments of a token row.
//
//   sum_sq[t, s] = sum over ranks of sum_j x_s[t, j]^2      (fp32)
//   out_s[t, j]  = x_s[t, j] * rsqrt(sum_sq[t, s] / full_width_s + eps) * w_s[j]
//
// rms_norm is one segment; qk_norm is two (q and k, read in place as column slices of qkv).
// MODE says where sum_sq comes from and where it goes (ArmsMode): computed locally (LOCAL,
// STATS_OUT), read from a tensor (STATS_IN), or exchanged through the Lamport buffers (LAMPORT).
//
// Work layout: a block owns tiles of `tokens_per_tile` consecutive tokens. Each thread owns the
// same VPT vectors (of VEC elements) of every token row, so it loads all of a tile's vectors at
// once, keeps them in registers across the reduction and the exchange, and writes them back
// normalized: each input byte is read once and each output byte written once.
#pragma once

#include "backend_api.h"
#include "lamport.cuh"
#include "platform.h"
#include "vec.cuh"

namespace arms {

constexpr int kMaxBlockThreads = 512;
constexpr int kRegisterVectors = 8;  // vectors of activations each thread holds per tile

struct KernelSegment {
  const void* in;
  void* out;
  const void* weight;
  int64_t in_stride;
  int64_t out_stride;
  int32_t vecs;  // vectors of this segment in one row
  int32_t weight_dtype;
  float inv_full_width;
};

struct KernelParams {
  KernelSegment seg[ARMS_MAX_SEGMENTS];
  int32_t num_segments;
  int32_t row_vecs;  // vectors of all segments in one row
  int32_t tokens;
  int32_t tokens_per_tile;
  float eps;
  float* stats;  // [tokens, num_segments]
  LamportParams lamport;
};

template <class D, int VEC, int VPT, int MODE>
__global__ void __launch_bounds__(kMaxBlockThreads) norm_kernel(const KernelParams p) {
  using S = typename D::storage;
  constexpr int TPB = VPT >= kRegisterVectors ? 1 : kRegisterVectors / VPT;  // tokens per tile, at most
  constexpr int kWarp = platform::kWarpSize;
  constexpr int kMaxWarps = kMaxBlockThreads / kWarp;
  constexpr bool kSums = MODE != ARMS_MODE_STATS_IN;
  constexpr bool kNormalizes = MODE != ARMS_MODE_STATS_OUT;
  constexpr bool kCacheWeights = kNormalizes && VPT * VEC <= 16;

  __shared__ float warp_partial[kMaxWarps][TPB * ARMS_MAX_SEGMENTS];
  __shared__ float row_scale[TPB * ARMS_MAX_SEGMENTS];

  // Nothing of the previous kernel in the stream (inputs, workspace state) is read before this.
  platform::pdl_wait();
  // Safe to let the next kernel launch now: it stops at its own pdl_wait() until this grid has
  // finished and its writes (the epoch update included) are visible.
  platform::pdl_trigger();

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int nwarps = blockDim.x / kWarp;

  // The columns this thread owns, resolved once (no dynamic indexing of the parameter struct).
  int seg_of[VPT];
  int64_t col[VPT];
  const S* in_base[VPT];
  S* out_base[VPT];
  int64_t in_stride[VPT];
  int64_t out_stride[VPT];
  float weight[kCacheWeights ? VPT : 1][kCacheWeights ? VEC : 1];
#pragma unroll
  for (int c = 0; c < VPT; ++c) {
    const int j = tid + c * blockDim.x;
    const int s = j < p.seg[0].vecs ? 0 : 1;
    seg_of[c] = j < p.row_vecs ? s : -1;
    col[c] = static_cast<int64_t>(s == 0 ? j : j - p.seg[0].vecs) * VEC;
    in_base[c] = static_cast<const S*>(s == 0 ? p.seg[0].in : p.seg[1].in);
    out_base[c] = static_cast<S*>(s == 0 ? p.seg[0].out : p.seg[1].out);
    in_stride[c] = s == 0 ? p.seg[0].in_stride : p.seg[1].in_stride;
    out_stride[c] = s == 0 ? p.seg[0].out_stride : p.seg[1].out_stride;
    if constexpr (kCacheWeights) {
      if (seg_of[c] >= 0)
        load_weight<VEC>(s == 0 ? p.seg[0].weight : p.seg[1].weight, s == 0 ? p.seg[0].weight_dtype : p.seg[1].weight_dtype,
                         col[c], weight[c]);
    }
  }

  // Lamport state of this launch. Every thread reads the control words itself (one broadcast
  // load per warp), which saves a barrier before the first tile.
  uint32_t epoch = 0, slot = 0;
  bool failed = false;
  if constexpr (MODE == ARMS_MODE_LAMPORT) {
    const LamportParams& lp = p.lamport;
    epoch = platform::load_relaxed_sys(&lp.ctrl->epoch);
    failed = platform::load_relaxed_sys(&lp.ctrl->failed) != 0u;
    slot = epoch % kSlots;
    if (!failed) clear_previous_slot(lp, epoch, platform::load_relaxed_sys(&lp.ctrl->prev_tokens));
  }

  const int tpb = p.tokens_per_tile;
  const int ntiles = (p.tokens + tpb - 1) / tpb;
  for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int t0 = tile * tpb;
    Vec<D, VEC> x[TPB][VPT];
#pragma unroll
    for (int k = 0; k < TPB; ++k)
#pragma unroll
      for (int c = 0; c < VPT; ++c)
        if (k < tpb && t0 + k < p.tokens && seg_of[c] >= 0) x[k][c].load(in_base[c] + (t0 + k) * in_stride[c] + col[c]);

    const int cell = tid;  // threads [0, tpb * 2) each finish one (token, segment) statistic
    const int cell_token = t0 + cell / ARMS_MAX_SEGMENTS;
    const int cell_seg = cell % ARMS_MAX_SEGMENTS;
    const bool owns_cell = cell < tpb * ARMS_MAX_SEGMENTS && cell_seg < p.num_segments && cell_token < p.tokens;
    const float inv_width = cell_seg == 0 ? p.seg[0].inv_full_width : p.seg[1].inv_full_width;

    if constexpr (kSums) {
      float acc[TPB][ARMS_MAX_SEGMENTS];
#pragma unroll
      for (int k = 0; k < TPB; ++k) {
        acc[k][0] = 0.f;
        acc[k][1] = 0.f;
#pragma unroll
        for (int c = 0; c < VPT; ++c) {
          if (k < tpb && t0 + k < p.tokens && seg_of[c] >= 0) {
            const float s = x[k][c].sum_of_squares();
            acc[k][0] += seg_of[c] == 0 ? s : 0.f;
            acc[k][1] += seg_of[c] == 1 ? s : 0.f;
          }
        }
      }
#pragma unroll
      for (int k = 0; k < TPB; ++k) {
        if (k >= tpb) break;
#pragma unroll
        for (int s = 0; s < ARMS_MAX_SEGMENTS; ++s) {
          if (s >= p.num_segments) break;
          const float v = platform::warp_sum(acc[k][s]);
          if (lane == 0) warp_partial[warp][k * ARMS_MAX_SEGMENTS + s] = v;
        }
      }
      __syncthreads();
      if (owns_cell) {
        float partial = 0.f;
        for (int w = 0; w < nwarps; ++w) partial += warp_partial[w][cell];  // fixed order: deterministic
        float sum = partial;
        if constexpr (MODE == ARMS_MODE_STATS_OUT) {
          p.stats[static_cast<int64_t>(cell_token) * p.num_segments + cell_seg] = partial;
        } else if constexpr (MODE == ARMS_MODE_LAMPORT) {
          sum = failed ? __int_as_float(0x7fc00000)
                       : exchange_partial(p.lamport, slot, epoch, cell_token, cell_seg, p.tokens, partial);
        }
        row_scale[cell] = rsqrtf(sum * inv_width + p.eps);
      }
    } else {
      if (owns_cell)
        row_scale[cell] = rsqrtf(p.stats[static_cast<int64_t>(cell_token) * p.num_segments + cell_seg] * inv_width + p.eps);
    }

    if constexpr (kNormalizes) {
      __syncthreads();
#pragma unroll
      for (int k = 0; k < TPB; ++k) {
#pragma unroll
        for (int c = 0; c < VPT; ++c) {
          if (k < tpb && t0 + k < p.tokens && seg_of[c] >= 0) {
            const float scale = row_scale[k * ARMS_MAX_SEGMENTS + seg_of[c]];
            float w[VEC];
            if constexpr (kCacheWeights) {
#pragma unroll
              for (int i = 0; i < VEC; ++i) w[i] = weight[c][i];
            } else {
              const int s = seg_of[c];
              load_weight<VEC>(s == 0 ? p.seg[0].weight : p.seg[1].weight,
                               s == 0 ? p.seg[0].weight_dtype : p.seg[1].weight_dtype, col[c], w);
            }
            Vec<D, VEC> y;
#pragma unroll
            for (int i = 0; i < VEC; ++i) y.set(i, x[k][c].get(i) * scale * w[i]);
            y.store(out_base[c] + (t0 + k) * out_stride[c] + col[c]);
          }
        }
      }
    }
  }

  if constexpr (MODE == ARMS_MODE_LAMPORT) {
    if (!failed) finish_launch(p.lamport, epoch, p.tokens);
  }
}

// Fill a workspace buffer with the sentinel (cudaMemset cannot write a 32-bit pattern).
__global__ void fill_cells_kernel(uint32_t* cells, int64_t count, uint32_t value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    cells[i] = value;
}

// Functional peer check: write a token into every peer's probe cell, then wait (bounded) for
// every peer's token in our own. drop_peer_writes simulates a link that reports P2P but loses
// writes (the failure that makes other implementations hang).
__global__ void probe_kernel(LamportParams lp, uint32_t nonce, int drop_peer_writes, int* all_arrived) {
  const int r = threadIdx.x;
  const int64_t probe = probe_offset(lp.nranks, lp.capacity);
  if (r < lp.nranks && (r == lp.rank || !drop_peer_writes))
    platform::store_relaxed_sys(lp.buffers[r] + probe + lp.rank, nonce ^ static_cast<uint32_t>(lp.rank + 1));
  __syncthreads();
  bool ok = true;
  if (r < lp.nranks) {
    const uint32_t expected = nonce ^ static_cast<uint32_t>(r + 1);
    const uint32_t* cell = lp.buffers[lp.rank] + probe + r;
    const uint64_t start = platform::timer_ns();
    while (platform::load_relaxed_sys(cell) != expected) {
      if (platform::timer_ns() - start > static_cast<uint64_t>(lp.timeout_ns)) {
        ok = false;
        break;
      }
    }
  }
  if (!ok) atomicExch(all_arrived, 0);
}

}  // namespace arms

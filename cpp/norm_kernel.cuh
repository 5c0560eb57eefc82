// The one normalization kernel, over a list of (at most two) column segments of a token row.
//
//   sum_sq[t, s] = sum over ranks of sum_j x_s[t, j]^2      (fp32)
//   out_s[t, j]  = x_s[t, j] * rsqrt(sum_sq[t, s] / full_width_s + eps) * w_s[j]
//
// rms_norm is one segment; qk_norm is two (q and k, read in place as column slices of qkv).
// MODE says where sum_sq comes from and where it goes (ArmsMode): computed locally (LOCAL,
// STATS_OUT), read from a tensor (STATS_IN), or exchanged through the Lamport buffers (LAMPORT).
//
// Work layout: a block owns tiles of `tokens_per_tile` consecutive tokens (grid-stride). Each
// thread owns the same VPT vectors (of VEC elements) of every token row, so it loads all of a
// tile's vectors at once, keeps them in registers across the reduction and the exchange, and
// writes them back normalized: each input byte is read once and each output byte written once.
#pragma once

#include "backend_api.h"
#include "lamport.cuh"
#include "platform.h"
#include "vec.cuh"

namespace arms {

constexpr int kMaxBlockThreads = 512;

// Tokens per tile, at most, for VPT vectors per thread and token: 8 vectors (32 registers of
// activations) per thread. Large tiles mean fewer exchanges per block at large T; two blocks per
// SM (the launch bound below) let one block's exchange overlap the other's memory traffic.
// (Measured on H100, TP2, T=16384: double-buffered tiles of 4 tokens at one block per SM ran at
// 2.1x the roofline, exchange-latency bound.)
ARMS_HOST_DEVICE constexpr int tile_tokens_max(int vpt) { return vpt >= 8 ? 1 : 8 / vpt; }
constexpr int kMinBlocksPerSm = 2;

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
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) norm_kernel(const KernelParams p) {
  using S = typename D::storage;
  using V = Vec<D, VEC>;
  constexpr int TPB = tile_tokens_max(VPT);
  constexpr int kWarp = platform::kWarpSize;
  constexpr int kMaxWarps = kMaxBlockThreads / kWarp;
  constexpr int kCells = TPB * ARMS_MAX_SEGMENTS;  // (token, segment) statistics per tile
  constexpr bool kSums = MODE != ARMS_MODE_STATS_IN;
  constexpr bool kNormalizes = MODE != ARMS_MODE_STATS_OUT;
  constexpr bool kCacheWeights = kNormalizes && VPT * VEC <= 16;

  __shared__ float warp_partial[kMaxWarps][kCells];
  __shared__ float row_scale[kCells];

  // Nothing of the previous kernel in the stream (inputs, workspace state) is read before this.
  platform::pdl_wait();
  // Safe to let the next kernel launch now: it stops at its own pdl_wait() until this grid has
  // finished and its writes (the epoch update included) are visible.
  platform::pdl_trigger();

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int nwarps = blockDim.x / kWarp;

  // The columns this thread owns. Segment pointers and strides are read from the parameter
  // bank at each use instead of being held in registers (two blocks per SM must fit).
  int seg_of[VPT];
  int col[VPT];
#pragma unroll
  for (int c = 0; c < VPT; ++c) {
    const int j = tid + c * blockDim.x;
    const int s = j < p.seg[0].vecs ? 0 : 1;
    seg_of[c] = j < p.row_vecs ? s : -1;
    col[c] = (s == 0 ? j : j - p.seg[0].vecs) * VEC;
  }
  auto in_ptr = [&](int s, int token, int column) {
    const KernelSegment& g = s == 0 ? p.seg[0] : p.seg[1];
    return static_cast<const S*>(g.in) + token * g.in_stride + column;
  };
  auto out_ptr = [&](int s, int token, int column) {
    const KernelSegment& g = s == 0 ? p.seg[0] : p.seg[1];
    return static_cast<S*>(g.out) + token * g.out_stride + column;
  };

  const int tpb = p.tokens_per_tile;
  const int ntiles = (p.tokens + tpb - 1) / tpb;
  auto load_tile = [&](auto& x, int tile) {
    const int t0 = tile * tpb;
#pragma unroll
    for (int k = 0; k < TPB; ++k)
#pragma unroll
      for (int c = 0; c < VPT; ++c)
        if (k < tpb && t0 + k < p.tokens && seg_of[c] >= 0) x[k][c].load(in_ptr(seg_of[c], t0 + k, col[c]));
  };

  V x[TPB][VPT];
  int tile = blockIdx.x;
  if (tile < ntiles) load_tile(x, tile);

  float weight[kCacheWeights ? VPT : 1][kCacheWeights ? VEC : 1];
  if constexpr (kCacheWeights) {
#pragma unroll
    for (int c = 0; c < VPT; ++c)
      if (seg_of[c] >= 0) {
        const int s = seg_of[c];
        load_weight<VEC>(s == 0 ? p.seg[0].weight : p.seg[1].weight, s == 0 ? p.seg[0].weight_dtype : p.seg[1].weight_dtype,
                         col[c], weight[c]);
      }
  }

  // Lamport state of this launch: plain L2 loads the compiler overlaps with the loads above.
  uint32_t epoch = 0, slot = 0;
  bool failed = false;
  int group = 1;  // lanes per exchanged statistic: next power of two >= nranks
  if constexpr (MODE == ARMS_MODE_LAMPORT) {
    const LamportParams& lp = p.lamport;
    epoch = platform::load_l2(&lp.ctrl->epoch);
    failed = platform::load_l2(&lp.ctrl->failed) != 0u;
    slot = epoch % kSlots;
    while (group < lp.nranks) group <<= 1;
    if (!failed) clear_previous_slot(lp, epoch, platform::load_l2(&lp.ctrl->prev_tokens));
  }

  auto inv_width = [&](int s) { return s == 0 ? p.seg[0].inv_full_width : p.seg[1].inv_full_width; };

  // One tile: statistics, exchange, normalize; then the next tile's loads.
  auto process_tile = [&](auto& cur, int tile, int next) {
    const int t0 = tile * tpb;

    if constexpr (kSums) {
      float acc[TPB][ARMS_MAX_SEGMENTS];
#pragma unroll
      for (int k = 0; k < TPB; ++k) {
        acc[k][0] = 0.f;
        acc[k][1] = 0.f;
#pragma unroll
        for (int c = 0; c < VPT; ++c) {
          if (k < tpb && t0 + k < p.tokens && seg_of[c] >= 0) {
            const float s = cur[k][c].sum_of_squares();
            acc[k][0] += seg_of[c] == 0 ? s : 0.f;
            acc[k][1] += seg_of[c] == 1 ? s : 0.f;
          }
        }
      }
      // A guard rather than early exits: clang will not unroll a loop that breaks around a
      // cross-lane shuffle, and acc[][] would then live in scratch memory on AMD.
#pragma unroll
      for (int k = 0; k < TPB; ++k) {
#pragma unroll
        for (int s = 0; s < ARMS_MAX_SEGMENTS; ++s) {
          if (k < tpb && s < p.num_segments) {
            const float v = platform::warp_sum(acc[k][s]);
            if (lane == 0) warp_partial[warp][k * ARMS_MAX_SEGMENTS + s] = v;
          }
        }
      }
      __syncthreads();
    }

    if constexpr (MODE == ARMS_MODE_LAMPORT) {
      const int live_cells = tpb * ARMS_MAX_SEGMENTS;
      if (warp * kWarp < live_cells * group) {  // whole warps only: the sum below shuffles
        const int cell = tid / group;
        const int r = tid % group;
        const int token = t0 + cell / ARMS_MAX_SEGMENTS;
        const int seg = cell % ARMS_MAX_SEGMENTS;
        const bool active = cell < live_cells && seg < p.num_segments && token < p.tokens;
        float v = 0.f;
        if (active && r < p.lamport.nranks) {
          float partial = 0.f;
          for (int w = 0; w < nwarps; ++w) partial += warp_partial[w][cell];  // fixed order
          v = failed ? __int_as_float(0x7fc00000)
                     : exchange_lane(p.lamport, slot, epoch, token, seg, p.tokens, partial, r);
        }
        // Every rank adds the same N values in the same (rank) order: identical bits everywhere.
        const int first = lane - r;
        float total = 0.f;
        for (int q = 0; q < p.lamport.nranks; ++q) total += platform::warp_shfl(v, first + q);
        if (active && r == 0) row_scale[cell] = rsqrtf(total * inv_width(seg) + p.eps);
      }
    } else {
      // STATS_IN has no barrier above: keep this tile's row_scale writes behind the previous
      // tile's reads of it.
      if constexpr (!kSums) __syncthreads();
      const int cell = tid;
      const int token = t0 + cell / ARMS_MAX_SEGMENTS;
      const int seg = cell % ARMS_MAX_SEGMENTS;
      if (cell < tpb * ARMS_MAX_SEGMENTS && seg < p.num_segments && token < p.tokens) {
        float* stat = p.stats ? p.stats + static_cast<int64_t>(token) * p.num_segments + seg : nullptr;
        float sum;
        if constexpr (kSums) {
          sum = 0.f;
          for (int w = 0; w < nwarps; ++w) sum += warp_partial[w][cell];  // fixed order
          if constexpr (MODE == ARMS_MODE_STATS_OUT) *stat = sum;
        } else {
          sum = *stat;
        }
        row_scale[cell] = rsqrtf(sum * inv_width(seg) + p.eps);
      }
    }
    // Also keeps the next tile's warp_partial writes behind this tile's reads of them.
    __syncthreads();

    if constexpr (kNormalizes) {
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
            V y;
#pragma unroll
            for (int i = 0; i < VEC; ++i) y.set(i, cur[k][c].get(i) * scale * w[i]);
            y.store(out_ptr(seg_of[c], t0 + k, col[c]));
          }
        }
      }
    }
    if (next < ntiles) load_tile(cur, next);
  };

  for (; tile < ntiles; tile += gridDim.x) process_tile(x, tile, tile + gridDim.x);

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

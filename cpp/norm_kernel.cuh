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

// Tokens per tile, at most, for VPT vectors per thread and token. A thread holds two tiles of
// activations (8 vectors, 32 registers for 16-bit types): while one tile's statistics cross the
// interconnect, the next tile is loaded, reduced and its statistics sent, so each block always
// has an exchange in flight. Two blocks per SM (the launch bound below) overlap further.
// (Measured on H100/H200, TP2, T=16384: one 8-token tile at a time was exchange-latency bound.)
ARMS_HOST_DEVICE constexpr int tile_tokens_max(int vpt) { return vpt >= 4 ? 1 : 4 / vpt; }
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

  __shared__ float warp_partial[2][kMaxWarps][kCells];  // [tile parity][warp][cell]
  __shared__ float row_scale[2][kCells];

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

  V xa[TPB][VPT];
  V xb[TPB][VPT];
  const int first_tile = blockIdx.x;
  if (first_tile < ntiles) load_tile(xa, first_tile);

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

  // Per-thread sums of squares of one tile into warp_partial[buf] (the caller synchronizes).
  auto reduce_tile = [&](auto& x, int tile, int buf) {
    if constexpr (kSums) {
      const int t0 = tile * tpb;
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
      // A guard rather than early exits: clang will not unroll a loop that breaks around a
      // cross-lane shuffle, and acc[][] would then live in scratch memory on AMD.
#pragma unroll
      for (int k = 0; k < TPB; ++k) {
#pragma unroll
        for (int s = 0; s < ARMS_MAX_SEGMENTS; ++s) {
          if (k < tpb && s < p.num_segments) {
            const float v = platform::warp_sum(acc[k][s]);
            if (lane == 0) warp_partial[buf][warp][k * ARMS_MAX_SEGMENTS + s] = v;
          }
        }
      }
    }
  };

  // This rank's statistic of one cell, added over warps in a fixed order (deterministic).
  auto block_partial = [&](int buf, int cell) {
    float partial = 0.f;
    for (int w = 0; w < nwarps; ++w) partial += warp_partial[buf][w][cell];
    return partial;
  };

  // Lamport lanes: lanes [g*group, (g+1)*group) serve cell g of the tile, lane r talks to rank r.
  const int lamport_cell = tid / group;
  const int lamport_peer = tid % group;
  auto lamport_lane_active = [&](int tile) {
    const int token = tile * tpb + lamport_cell / ARMS_MAX_SEGMENTS;
    const int seg = lamport_cell % ARMS_MAX_SEGMENTS;
    return lamport_cell < tpb * ARMS_MAX_SEGMENTS && seg < p.num_segments && token < p.tokens;
  };

  // After reduce_tile + barrier: make the tile's statistics available. LAMPORT sends them to every
  // peer (the wait comes later, in collect); the local modes finish the scale here.
  auto publish = [&](int tile, int buf) {
    const int t0 = tile * tpb;
    if constexpr (MODE == ARMS_MODE_LAMPORT) {
      if (!failed && lamport_lane_active(tile) && lamport_peer < p.lamport.nranks && lamport_peer != p.lamport.rank)
        send_partial(p.lamport, slot, t0 + lamport_cell / ARMS_MAX_SEGMENTS, lamport_cell % ARMS_MAX_SEGMENTS,
                     block_partial(buf, lamport_cell), lamport_peer);
    } else {
      const int cell = tid;
      const int token = t0 + cell / ARMS_MAX_SEGMENTS;
      const int seg = cell % ARMS_MAX_SEGMENTS;
      if (cell < tpb * ARMS_MAX_SEGMENTS && seg < p.num_segments && token < p.tokens) {
        float* stat = p.stats ? p.stats + static_cast<int64_t>(token) * p.num_segments + seg : nullptr;
        float sum;
        if constexpr (kSums) {
          sum = block_partial(buf, cell);
          if constexpr (MODE == ARMS_MODE_STATS_OUT) *stat = sum;
        } else {
          sum = *stat;
        }
        row_scale[buf][cell] = rsqrtf(sum * inv_width(seg) + p.eps);
      }
    }
  };

  // LAMPORT: wait for every peer's statistic of the tile and finish its scale.
  auto collect = [&](int tile, int buf) {
    if constexpr (MODE == ARMS_MODE_LAMPORT) {
      if (warp * kWarp >= tpb * ARMS_MAX_SEGMENTS * group) return;  // whole warps: the sum shuffles
      const int t0 = tile * tpb;
      const int token = t0 + lamport_cell / ARMS_MAX_SEGMENTS;
      const int seg = lamport_cell % ARMS_MAX_SEGMENTS;
      const bool active = lamport_lane_active(tile);
      float v = 0.f;
      if (active && lamport_peer < p.lamport.nranks) {
        const float partial = block_partial(buf, lamport_cell);
        v = failed ? __int_as_float(0x7fc00000)
                   : receive_partial(p.lamport, slot, epoch, token, seg, p.tokens, partial, lamport_peer);
      }
      // Every rank adds the same N values in the same (rank) order: identical bits everywhere.
      const int first = lane - lamport_peer;
      float total = 0.f;
      for (int q = 0; q < p.lamport.nranks; ++q) total += platform::warp_shfl(v, first + q);
      if (active && lamport_peer == 0) row_scale[buf][lamport_cell] = rsqrtf(total * inv_width(seg) + p.eps);
    }
  };

  auto normalize = [&](auto& x, int tile, int buf) {
    if constexpr (kNormalizes) {
      const int t0 = tile * tpb;
#pragma unroll
      for (int k = 0; k < TPB; ++k) {
#pragma unroll
        for (int c = 0; c < VPT; ++c) {
          if (k < tpb && t0 + k < p.tokens && seg_of[c] >= 0) {
            const float scale = row_scale[buf][k * ARMS_MAX_SEGMENTS + seg_of[c]];
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
            for (int i = 0; i < VEC; ++i) y.set(i, x[k][c].get(i) * scale * w[i]);
            y.store(out_ptr(seg_of[c], t0 + k, col[c]));
          }
        }
      }
    }
  };

  // Software pipeline over this block's tiles: tile i is normalized only after tile i+1 has been
  // loaded, reduced and published, so the wait for tile i's peers overlaps that work.
  // Shared buffers alternate by tile parity; each is rewritten two tiles later, after a barrier
  // every reader of its previous contents has passed.
  auto step = [&](auto& cur, auto& nxt, int tile, int buf) {
    const int next = tile + gridDim.x;
    if (next < ntiles) {  // the same for every thread of the block: the barrier is safe
      load_tile(nxt, next);
      reduce_tile(nxt, next, buf ^ 1);
      __syncthreads();
      publish(next, buf ^ 1);
    }
    collect(tile, buf);
    __syncthreads();
    normalize(cur, tile, buf);
    return next;
  };

  if (first_tile < ntiles) {
    reduce_tile(xa, first_tile, 0);
    __syncthreads();
    publish(first_tile, 0);
  }
  for (int tile = first_tile; tile < ntiles;) {
    tile = step(xa, xb, tile, 0);
    if (tile >= ntiles) break;
    tile = step(xb, xa, tile, 1);
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

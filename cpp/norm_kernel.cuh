// The one normalization kernel, over a list of (at most two) column segments of a token row.
//
//   sum_sq[t, s] = sum over ranks of sum_j x_s[t, j]^2      (fp32)
//   out_s[t, j]  = x_s[t, j] * rsqrt(sum_sq[t, s] / full_width_s + eps) * w_s[j]
//
// rms_norm is one segment; qk_norm is two (q and k, read in place as column slices of qkv).
// MODE says where sum_sq comes from and where it goes (ArmsMode): computed locally (LOCAL,
// STATS_OUT), read from a tensor (STATS_IN), or exchanged through the Lamport buffers (LAMPORT).
//
// Work layout: one block is one token group of G warps (G = blockDim.x / warp size, chosen by
// the launcher from T: many warps per token at decode, few at prefill). A block walks its tokens
// t = blockIdx.x, + gridDim.x, ...; each thread owns VPT vectors (of VEC elements) of every row,
// at vector columns tid, tid + blockDim.x, ... It keeps a token's vectors in registers from the
// load to the store, so each input byte is read once and each output byte written once, and it
// publishes the block's next token before it waits for the current token's peers.
//
// Per token, the phases are named device functions below:
//   load_row -> local_partials -> block_partials -> publish (send to peers | write stats)
//   -> exchanged_sums (peers' partials | local | stats) -> normalize_store
#pragma once

#include "backend_api.h"
#include "lamport.cuh"
#include "platform.h"
#include "vec.cuh"

namespace arms {

constexpr int kMaxBlockThreads = 512;
constexpr int kMaxGroupWarps = kMaxBlockThreads / platform::kWarpSize;

#ifndef ARMS_TRACE_ALL_BLOCKS
#define ARMS_TRACE_ALL_BLOCKS 0  // 1: a trace build (CMake ALLREDUCE_RMS_TRACE_ALL_BLOCKS=ON); see stamp_latest
#endif

struct KernelSegment {
  const void* in;
  void* out;
  const void* weight;
  int64_t in_stride;
  int64_t out_stride;
  int32_t vecs;  // vectors of this segment in one row
  int32_t weight_dtype;
  float inv_full_width;
  // The variants (ArmsSegment, ABI 4): only the wide-row kernel reads these; the launcher sends
  // every call that sets one of them there.
  const void* gate;
  int64_t gate_stride;
  int32_t gate_dtype;
  int32_t flags;          // ArmsVariantFlags
  float weight_offset;
  int32_t groups_in_row;  // 1, or independent groups of `vecs` columns per row (token = row * groups + group)
};

struct KernelParams {
  KernelSegment seg[ARMS_MAX_SEGMENTS];
  int32_t num_segments;
  int32_t row_vecs;  // vectors of all segments in one row
  int32_t tokens;
  float eps;
  float* stats;  // [tokens, num_segments]
  int32_t rank_first;  // LAMPORT: the statistic adds the partials of ranks [rank_first, rank_first + rank_count)
  int32_t rank_count;
  // Plan knobs (the launcher's choice, or the tuning override):
  int32_t prefetch_rows;  // > 0: a block walking several rows asks L2 for the row this many grid strides
                          // beyond the one it loads (16-byte vector plans, sm_90)
  int32_t early_weights;  // 1: a block with one row fetches its weights with the row, before the exchange
  int32_t epoch_per_block;  // 1: one thread per block reads the epoch (read_epoch_per_block), else one per warp
  int32_t prewait_prefetch;  // 1: before the PDL wait, a block asks L2 for its first two rows (16-byte
                             // vector plans, sm_90); see norm_kernel
  LamportParams lamport;
};

// The columns one thread owns: its vector i is vector column threadIdx.x + i * blockDim.x of
// the row, in segment seg(i) (-1 beyond the row) at element column col(i) of that segment.
// Computed at each use rather than held in registers: a few integer operations are cheaper
// than 2 * VPT registers at prefill, where registers bound how many rows are in flight.
template <int VEC, int VPT>
struct ThreadColumns {
  int seg0_vecs;
  int row_vecs;
  __device__ __forceinline__ int vector(int i) const { return threadIdx.x + i * blockDim.x; }
  __device__ __forceinline__ int seg(int i) const {
    const int j = vector(i);
    return j >= row_vecs ? -1 : (j < seg0_vecs ? 0 : 1);
  }
  __device__ __forceinline__ int col(int i) const {
    const int j = vector(i);
    return (j < seg0_vecs ? j : j - seg0_vecs) * VEC;
  }
};

template <int VEC, int VPT>
__device__ __forceinline__ ThreadColumns<VEC, VPT> thread_columns(const KernelParams& p) {
  return ThreadColumns<VEC, VPT>{p.seg[0].vecs, p.row_vecs};
}

__device__ __forceinline__ const KernelSegment& segment(const KernelParams& p, int s) { return s == 0 ? p.seg[0] : p.seg[1]; }

template <class D, int VEC, int VPT>
__device__ __forceinline__ void load_row(const KernelParams& p, const ThreadColumns<VEC, VPT>& c, int token,
                                         Vec<D, VEC> (&x)[VPT]) {
  using S = typename D::storage;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    if (c.seg(i) >= 0) {
      const KernelSegment& g = segment(p, c.seg(i));
      x[i].load(static_cast<const S*>(g.in) + token * g.in_stride + c.col(i));
    }
}

// This thread's sums of squares of one row, per segment.
template <class D, int VEC, int VPT>
__device__ __forceinline__ float2 local_partials(const ThreadColumns<VEC, VPT>& c, const Vec<D, VEC> (&x)[VPT]) {
  float2 acc = make_float2(0.f, 0.f);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const float s = c.seg(i) >= 0 ? x[i].sum_of_squares() : 0.f;
    if (c.seg(i) == 1)
      acc.y += s;
    else
      acc.x += s;
  }
  return acc;
}

// The block's (this rank's) sums of squares of one row, in every thread. A fixed reduction
// order, so the same inputs give the same bits. Warps > 1: each warp's sum goes through shared
// memory, in a buffer of the token's parity: it is rewritten two tokens later, after a barrier
// that every reader of this token has passed.
__device__ __forceinline__ float2 block_partials(float2 v, int parity, float2 (*warp_sums)[kMaxGroupWarps]) {
#pragma unroll
  for (int offset = platform::kWarpSize / 2; offset > 0; offset >>= 1) {
    v.x += platform::warp_shfl_xor(v.x, offset);
    v.y += platform::warp_shfl_xor(v.y, offset);
  }
  const int warps = blockDim.x / platform::kWarpSize;
  if (warps == 1) return v;
  const int lane = threadIdx.x % platform::kWarpSize;
  if (lane == 0) warp_sums[parity][threadIdx.x / platform::kWarpSize] = v;
  __syncthreads();
  // Every lane reads warp (lane mod G)'s sum; a butterfly over G lanes then gives each lane the
  // total, in the same order in every aligned group of G lanes.
  v = warp_sums[parity][lane & (warps - 1)];
  for (int offset = warps / 2; offset > 0; offset >>= 1) {
    v.x += platform::warp_shfl_xor(v.x, offset);
    v.y += platform::warp_shfl_xor(v.y, offset);
  }
  return v;
}

// The full-row sums of squares of `token`, from every rank's partials, added in rank order.
__device__ __forceinline__ float2 exchanged_sums(const KernelParams& p, const Epoch& e, int token, float2 partial) {
  const int lane = threadIdx.x % platform::kWarpSize;
  const float2 v = receive_partials(p.lamport, e, token, p.tokens, p.num_segments, partial.x, partial.y, lane);
  float2 total = make_float2(0.f, 0.f);
  // every rank of the group (all ranks, or the rank_group of a normalization group that covers
  // whole ranks) adds the same values in this order
  for (int r = p.rank_first; r < p.rank_first + p.rank_count; ++r) {
    total.x += platform::warp_shfl(v.x, r);
    total.y += platform::warp_shfl(v.y, r);
  }
  return total;
}

// weight_of(i, g, w) fills w with the weights of this thread's vector i (segment g): from
// registers fetched earlier, or loaded now.
template <class D, int VEC, int VPT, class WeightOf>
__device__ __forceinline__ void normalize_store(const KernelParams& p, const ThreadColumns<VEC, VPT>& c, int token,
                                                const Vec<D, VEC> (&x)[VPT], float2 scale, WeightOf weight_of) {
  using S = typename D::storage;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if (c.seg(i) < 0) continue;
    const KernelSegment& g = segment(p, c.seg(i));
    float w[VEC];
    weight_of(i, g, w);
    const float r = c.seg(i) == 1 ? scale.y : scale.x;
    Vec<D, VEC> y;
#pragma unroll
    for (int k = 0; k < VEC; ++k) y.set(k, x[i].get(k) * r * w[k]);
    y.store(static_cast<S*>(g.out) + token * g.out_stride + c.col(i));
  }
}

// Ask L2 for `token`'s row of every segment (one thread; 16-byte vector plans only, whose rows
// start on 16-byte boundaries and span whole 16-byte words, as the bulk prefetch needs).
template <class D, int VEC>
__device__ __forceinline__ void prefetch_row(const KernelParams& p, int token) {
  using S = typename D::storage;
  if constexpr (VEC * sizeof(S) == 16) {
    for (int s = 0; s < p.num_segments; ++s) {
      const KernelSegment& g = segment(p, s);
      platform::prefetch_l2(static_cast<const S*>(g.in) + static_cast<int64_t>(token) * g.in_stride,
                            static_cast<uint32_t>(g.vecs) * 16u);
    }
  }
}

// Do the weights of every segment have the activations' dtype (so they fit a Vec<D, VEC>)?
template <class D>
__device__ __forceinline__ bool weights_in_activation_dtype(const KernelParams& p) {
  return p.seg[0].weight_dtype == D::code && (p.num_segments == 1 || p.seg[1].weight_dtype == D::code);
}

// Optional per-phase timestamps (LAMPORT only; lp.trace set by the profiler): block 0's phases,
// then, in a trace build, the latest first row reduced and sent and the latest last store of all
// blocks (atomicMax).
enum TracePoint {
  kTraceEntry,
  kTraceWaited,
  kTraceLoaded,
  kTraceSent,
  kTraceArrived,
  kTraceStored,
  kTraceLastLoaded,
  kTraceLastStored
};
static_assert(kTraceLastStored < kTracePoints, "the trace row holds every point");

template <class D, int VEC, int VPT, int MODE>
__global__ void __launch_bounds__(kMaxBlockThreads) norm_kernel(const KernelParams p) {
  using V = Vec<D, VEC>;
  constexpr bool kSums = MODE != ARMS_MODE_STATS_IN;
  constexpr bool kNormalizes = MODE != ARMS_MODE_STATS_OUT;
  constexpr bool kCacheWeights = kNormalizes && VPT <= 2;
  constexpr bool kLamport = MODE == ARMS_MODE_LAMPORT;
  __shared__ float2 warp_sums[2][kMaxGroupWarps];  // [token parity][warp]
  __shared__ uint32_t epoch_words[2];              // read_epoch_per_block's {epoch, failed}

  // Before the PDL wait nothing is read that the previous kernel may write: only indices, clocks
  // and the kernel parameters (and the L2 prefetch below, which reads nothing into the block).
  const bool tracing = kLamport && p.lamport.trace != nullptr && blockIdx.x == 0 && threadIdx.x == 0;
  const uint64_t entered = tracing ? platform::timer_ns() : 0;
  const ThreadColumns<VEC, VPT> c = thread_columns<VEC, VPT>(p);
  const int lane = threadIdx.x % platform::kWarpSize;

  // While the previous kernel still runs (its last blocks, at large T), ask L2 for this block's
  // first two rows. Safe although that kernel may still be writing them: L2 is the GPU's point of
  // coherence (every SM's and every peer's write to this memory lands there), so a prefetch can
  // only put into L2 what a load would find there anyway; nothing is read into registers or L1.
  if (p.prewait_prefetch && threadIdx.x == 0) {
    const int first = static_cast<int>(blockIdx.x), second = first + static_cast<int>(gridDim.x);
    if (first < p.tokens) prefetch_row<D, VEC>(p, first);
    if (second < p.tokens) prefetch_row<D, VEC>(p, second);
  }

  // Nothing of the previous kernel in the stream (inputs, workspace state) is read before this.
  platform::pdl_wait();
  // Safe to let the next kernel launch now: it stops at its own pdl_wait() until this grid has
  // finished and its writes (the epoch update included) are visible. The dependents launch only
  // once every block of this grid has run this line, so they never take a slot one of ours needs.
  platform::pdl_trigger();
  const uint64_t waited = tracing ? platform::timer_ns() : 0;

  V xa[VPT], xb[VPT];
  int token = blockIdx.x;
  if (token < p.tokens) load_row<D, VEC, VPT>(p, c, token, xa);

  // Weights at VPT <= 2: loaded with the first row as fp32 and kept for every row.
  float weight[kCacheWeights ? VPT : 1][VEC];
  if constexpr (kCacheWeights) {
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (c.seg(i) >= 0) {
        const KernelSegment& g = segment(p, c.seg(i));
        load_weight<VEC>(g.weight, g.weight_dtype, c.col(i), weight[i]);
      }
  }
  auto cached_weight = [&](int i, const KernelSegment&, float(&w)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = weight[kCacheWeights ? i : 0][k];
  };
  auto loaded_weight = [&](int i, const KernelSegment& g, float(&w)[VEC]) {
    load_weight<VEC>(g.weight, g.weight_dtype, c.col(i), w);
  };
  // Weights at VPT > 2 when every block has one row (T up to the co-resident grid: about 1000
  // MiniMax rows on an H200): fetched with the row, in the activations' dtype, in the registers
  // the second row would take, so their latency hides behind the exchange instead of following it.
  constexpr bool kCanFetchEarly = kNormalizes && !kCacheWeights && VEC * sizeof(typename D::storage) == 16;
  const bool one_row = gridDim.x >= p.tokens;
  const bool early = kCanFetchEarly && one_row && p.early_weights && weights_in_activation_dtype<D>(p);
  V early_weight[kCanFetchEarly ? VPT : 1];
  if (early && token < p.tokens) {
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (c.seg(i) >= 0) {
        const KernelSegment& g = segment(p, c.seg(i));
        early_weight[kCanFetchEarly ? i : 0].load(static_cast<const typename D::storage*>(g.weight) + c.col(i));
      }
  }
  auto fetched_weight = [&](int i, const KernelSegment&, float(&w)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = early_weight[kCanFetchEarly ? i : 0].get(k);
  };

  Epoch e = {};
  uint64_t* trace = nullptr;  // this launch's row of timestamps, in block 0's first thread
  if constexpr (kLamport) {
    // one reader per block when there are several blocks; a single block reads per warp, with no
    // barrier (T = 1, 16 warps: 3.26 us per warp against 3.36 per block, in the shared-epoch kernel
    // of history/trace-H200-tp2-epoch-readers-sweep.json; not measured again since the epoch cells)
    if (p.epoch_per_block && gridDim.x > 1)
      e = read_epoch_per_block(p.lamport, epoch_words);
    else
      e = read_epoch(p.lamport, lane);
    if (tracing) {
      trace = trace_row(p.lamport, e);
      trace[kTraceEntry] = entered;
      trace[kTraceWaited] = waited;
    }
  }

  // Every block's part of the trace, in a trace build only (ARMS_TRACE_ALL_BLOCKS): raise a shared
  // stamp to now. Compiled out otherwise: with it, T = 1-256 measured 0.06-0.08 us slower in one
  // 2x H200 run (history/trace-H200-tp2-tail-claims-ab.json, run 4). (A build with stamps inside
  // the row loop and a claim counter in the control block was 2 us slower at T = 16384, run 2's
  // v3; which of the two cost it was not isolated.)
  auto stamp_latest = [&](TracePoint point) {
    if constexpr (ARMS_TRACE_ALL_BLOCKS && kLamport) {
      if (p.lamport.trace != nullptr && threadIdx.x == 0) {
        atomicMax(reinterpret_cast<unsigned long long*>(trace_row(p.lamport, e) + point),
                  static_cast<unsigned long long>(platform::timer_ns()));
      }
    }
  };

  // Reduce a loaded row and publish its partials: send them to the peers (LAMPORT) or write
  // them to the stats tensor (STATS_OUT). Returns this rank's partials of the row.
  auto reduce_publish = [&](const V(&x)[VPT], int t, int parity) {
    float2 partial = make_float2(0.f, 0.f);
    if constexpr (kSums) {
      partial = block_partials(local_partials<D, VEC, VPT>(c, x), parity, warp_sums);
      if (trace && t == blockIdx.x) trace[kTraceLoaded] = platform::timer_ns();
    }
    if constexpr (kLamport) {
      if (threadIdx.x < platform::kWarpSize && !e.failed)
        send_partials(p.lamport, e, t, p.num_segments, partial.x, partial.y, lane);
      if (trace && t == blockIdx.x) trace[kTraceSent] = platform::timer_ns();
    }
    if constexpr (MODE == ARMS_MODE_STATS_OUT) {
      if (threadIdx.x == 0) {
        p.stats[static_cast<int64_t>(t) * p.num_segments] = partial.x;
        if (p.num_segments == 2) p.stats[static_cast<int64_t>(t) * 2 + 1] = partial.y;
      }
    }
    return partial;
  };

  // The full-row statistics of a published row (peers' partials, own, or the stats tensor),
  // then the normalized row to the output, with the weights of weight_of.
  auto collect_store = [&](const V(&x)[VPT], int t, float2 partial, auto weight_of) {
    if constexpr (kNormalizes) {
      float2 sums = partial;
      if constexpr (kLamport) {
        sums = exchanged_sums(p, e, t, partial);
        if (trace && t == blockIdx.x) trace[kTraceArrived] = platform::timer_ns();
      }
      if constexpr (MODE == ARMS_MODE_STATS_IN) {
        sums.x = p.stats[static_cast<int64_t>(t) * p.num_segments];
        sums.y = p.num_segments == 2 ? p.stats[static_cast<int64_t>(t) * 2 + 1] : 0.f;
      }
      const float2 scale = make_float2(rsqrtf(sums.x * p.seg[0].inv_full_width + p.eps),
                                       rsqrtf(sums.y * p.seg[1].inv_full_width + p.eps));
      normalize_store<D, VEC, VPT>(p, c, t, x, scale, weight_of);
    }
  };
  auto collect_store_row = [&](const V(&x)[VPT], int t, float2 partial) {
    if constexpr (kCacheWeights)
      collect_store(x, t, partial, cached_weight);
    else
      collect_store(x, t, partial, loaded_weight);
  };

  // Software pipeline, two rows deep: `cur` holds row t, already published; `next` holds row
  // t + gridDim.x, loaded. Row t+1's partials go out before we wait for row t's peers, so two
  // exchanges are in flight, and cur's registers take row t+2 as soon as row t is stored.
  // Returns the block's next row and its partials. Unrolled by two so the buffers stay in
  // registers (no dynamic indexing).
  // With prefetch_rows = d, the row loaded is joined by an L2 request for the row d grid strides
  // further, so that load finds it in L2: DRAM stays busy while the block waits on the exchange.
  const int prefetch_stride = p.prefetch_rows > 0 ? p.prefetch_rows * static_cast<int>(gridDim.x) : 0;
  auto step = [&](V(&cur)[VPT], V(&next)[VPT], int t, float2 partial, int next_parity, float2& next_partial) {
    const int t1 = t + gridDim.x;
    if (t1 < p.tokens) next_partial = reduce_publish(next, t1, next_parity);
    collect_store_row(cur, t, partial);
    const int t2 = t1 + gridDim.x;
    if (t2 < p.tokens) {
      load_row<D, VEC, VPT>(p, c, t2, cur);
      if (prefetch_stride > 0 && threadIdx.x == 0 && t2 + prefetch_stride < p.tokens)
        prefetch_row<D, VEC>(p, t2 + prefetch_stride);
    }
    return t1;
  };

  if (token < p.tokens && early) {  // one row, weights already on their way
    const float2 partial = reduce_publish(xa, token, 0);
    stamp_latest(kTraceLastLoaded);
    collect_store(xa, token, partial, fetched_weight);
  } else if (token < p.tokens) {
    // rows 2 .. d + 1 grid strides on: the steps' own prefetches start beyond them
    if (prefetch_stride > 0 && threadIdx.x == 0)
      for (int k = 2; k < 2 + p.prefetch_rows; ++k)
        if (token + k * static_cast<int>(gridDim.x) < p.tokens) prefetch_row<D, VEC>(p, token + k * gridDim.x);
    float2 partial = reduce_publish(xa, token, 0);
    stamp_latest(kTraceLastLoaded);
    // (Tried together, in one 2x H200 run: loading the second row before reducing the first,
    // and prefetching the weights into L1 before the exchange wait. T >= 256 came out 7-17%
    // slower; taken out again, though that run's floors were also ~2% slower.)
    if (token + static_cast<int>(gridDim.x) < p.tokens) load_row<D, VEC, VPT>(p, c, token + gridDim.x, xb);
    float2 next_partial = make_float2(0.f, 0.f);
    for (;;) {
      token = step(xa, xb, token, partial, 1, next_partial);
      if (token >= p.tokens) break;
      token = step(xb, xa, token, next_partial, 0, partial);
      if (token >= p.tokens) break;
    }
  }

  if constexpr (kLamport) {
    if (trace) trace[kTraceStored] = platform::timer_ns();
    stamp_latest(kTraceLastStored);
    refresh_stale_packets(p.lamport, e, p.tokens, p.num_segments);
    finish_launch(p.lamport, e);
  }
}

// Functional peer check: write a token into every peer's probe cell, then wait (bounded) for
// every peer's token in our own. drop_peer_writes simulates a link that reports P2P but loses
// writes (the failure that makes other implementations hang).
__global__ void probe_kernel(LamportParams lp, uint32_t nonce, int drop_peer_writes, int* all_arrived) {
  const int r = threadIdx.x;
  const int64_t probe = probe_offset(lp.nranks, lp.capacity);
  if (r < lp.nranks && (r == lp.rank || !drop_peer_writes))
    platform::store_relaxed_sys_u64(lp.buffers[r] + probe + lp.rank, nonce ^ static_cast<uint32_t>(lp.rank + 1));
  __syncthreads();
  bool ok = true;
  if (r < lp.nranks) {
    const uint64_t expected = nonce ^ static_cast<uint32_t>(r + 1);
    const uint64_t* cell = lp.buffers[lp.rank] + probe + r;
    const uint64_t start = platform::timer_ns();
    while (platform::load_relaxed_sys_u64(cell) != expected) {
      if (platform::timer_ns() - start > static_cast<uint64_t>(lp.timeout_ns)) {
        ok = false;
        break;
      }
    }
  }
  if (!ok) atomicExch(all_arrived, 0);
}

// The machine's floors, timed by the benchmark next to the norm kernel (same launch path, PDL
// on where the norm kernel has it):
//   floor_empty_kernel     a launch that does nothing but the PDL wait;
//   floor_exchange_kernel  the smallest Lamport exchange: one value+flag packet to every peer,
//                          a poll for every peer's, no clearing and no fence (one warp).
__global__ void floor_empty_kernel() {
  platform::pdl_wait();
  platform::pdl_trigger();
}

__global__ void floor_exchange_kernel(LamportParams lp) {
  platform::pdl_wait();
  platform::pdl_trigger();
  const int lane = threadIdx.x;
  const uint32_t epoch = platform::load_l2(&lp.ctrl->floor_epoch);
  const uint32_t flag = flag_of(epoch);
  const int64_t cells = floor_offset(lp.nranks, lp.capacity) + (epoch % kSlots) * lp.nranks;
  if (lane < lp.nranks && lane != lp.rank)
    platform::store_relaxed_sys_u64(lp.buffers[lane] + cells + lp.rank, make_packet(1.0f, flag));
  if (lane < lp.nranks && lane != lp.rank) {
    const uint64_t* cell = lp.buffers[lp.rank] + cells + lane;
    const uint64_t start = platform::timer_ns();
    while (packet_flag(platform::load_relaxed_sys_u64(cell)) != flag)
      if (platform::timer_ns() - start > static_cast<uint64_t>(lp.timeout_ns)) break;
  }
  if (lane == 0) lp.ctrl->floor_epoch = (epoch + 1u) & kEpochMask;
}

}  // namespace arms

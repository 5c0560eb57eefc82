// The streaming variant of the norm kernel, for calls with many tokens per block.
//
// norm_kernel keeps a token's activations in registers from load to store, so a block has at
// most two tiles in flight, and at large T its time is the exchange latency paid tile after tile
// (1.8-1.9x the HBM roofline at T >= 8192 on H200 TP2). This kernel stages tokens in a ring of
// shared-memory slots instead, one token row per slot, and runs three things at once per block:
//
//   token i + P   being loaded (cp.async, P = kStreamPrefetch loads in flight)
//   token i       reduced and its statistic sent to the peers
//   token i - L   normalized and stored, L = lag tokens after its statistic was sent, by which
//                 time the peers' statistics have (usually) arrived and the wait is short
//
// so the exchange latency hides behind L tokens of streaming. Tokens go to blocks round-robin
// (block b takes b, b + grid, ...), one barrier per token. Only LOCAL and LAMPORT modes, 16-byte
// vectors, and rows whose ring fits in shared memory; the host falls back to norm_kernel otherwise.
//
// Shared-memory reuse: iteration i writes ring slot (i + P) % R, warp partials [i % R] and row
// scales [(i - L) % R]; their previous users are tokens that finished before the barrier of
// iteration i - 1 as long as R >= P + L + 1, which the host guarantees.
#pragma once

#include "norm_kernel.cuh"

namespace arms {

constexpr int kStreamPrefetch = 4;  // tokens whose loads are in flight ahead of the one reduced
constexpr int kStreamMaxRing = 16;  // ring slots at most (sizes the static arrays below)
// Tokens per block from which the host prefers this kernel (below it, the pipeline never fills).
constexpr int kStreamMinTokensPerBlock = 4;

template <class D, int VEC, int VPT, int MODE>
__global__ void __launch_bounds__(kMaxBlockThreads) stream_kernel(const KernelParams p) {
  static_assert(MODE == ARMS_MODE_LOCAL || MODE == ARMS_MODE_LAMPORT, "streaming covers LOCAL and LAMPORT");
  using V = Vec<D, VEC>;
  using S = typename D::storage;
  static_assert(sizeof(V) == 16, "the ring holds 16-byte vectors");
  constexpr int kWarp = platform::kWarpSize;
  constexpr int kMaxWarps = kMaxBlockThreads / kWarp;
  constexpr int P = kStreamPrefetch;
  constexpr bool kCacheWeights = VPT * VEC <= 16;

  extern __shared__ uint4 ring_words[];  // [ring_slots][row_vecs]
  __shared__ float warp_partial[kStreamMaxRing][kMaxWarps][ARMS_MAX_SEGMENTS];
  __shared__ float row_scale[kStreamMaxRing][ARMS_MAX_SEGMENTS];
  V* ring = reinterpret_cast<V*>(ring_words);

  platform::pdl_wait();  // nothing of the previous kernel is read before this
  platform::pdl_trigger();

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int slots = p.ring_slots;
  const int lag = p.lag;
  const int ntokens = blockIdx.x < p.tokens ? (p.tokens - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  auto token_of = [&](int i) { return static_cast<int>(blockIdx.x) + i * static_cast<int>(gridDim.x); };

  int seg_of[VPT];  // -1: this thread has no vector c
  int col[VPT];
#pragma unroll
  for (int c = 0; c < VPT; ++c) {
    const int j = tid + c * blockDim.x;
    const int s = j < p.seg[0].vecs ? 0 : 1;
    seg_of[c] = j < p.row_vecs ? s : -1;
    col[c] = (s == 0 ? j : j - p.seg[0].vecs) * VEC;
  }
  auto slot_vec = [&](int i, int c) -> V& { return ring[(i % slots) * p.row_vecs + tid + c * blockDim.x]; };

  // Start token i's loads (an empty group past the end, so group counting stays uniform).
  auto issue_load = [&](int i) {
    if (i < ntokens) {
      const int t = token_of(i);
#pragma unroll
      for (int c = 0; c < VPT; ++c)
        if (seg_of[c] >= 0) {
          const KernelSegment& g = seg_of[c] == 0 ? p.seg[0] : p.seg[1];
          platform::async_copy16(&slot_vec(i, c), static_cast<const S*>(g.in) + t * g.in_stride + col[c]);
        }
    }
    platform::async_commit();
  };
  for (int i = 0; i < P; ++i) issue_load(i);

  float weight[kCacheWeights ? VPT : 1][kCacheWeights ? VEC : 1];
  if constexpr (kCacheWeights) {
#pragma unroll
    for (int c = 0; c < VPT; ++c)
      if (seg_of[c] >= 0) {
        const KernelSegment& g = seg_of[c] == 0 ? p.seg[0] : p.seg[1];
        load_weight<VEC>(g.weight, g.weight_dtype, col[c], weight[c]);
      }
  }

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
  auto block_partial = [&](int i, int s) {  // fixed order over warps: deterministic
    float sum = 0.f;
    for (int w = 0; w < nwarps; ++w) sum += warp_partial[i % slots][w][s];
    return sum;
  };

  // Token i's loads have landed (for this thread): its per-warp sums of squares.
  auto reduce = [&](int i) {
    platform::async_wait<P - 1>();
    float acc[ARMS_MAX_SEGMENTS] = {0.f, 0.f};
#pragma unroll
    for (int c = 0; c < VPT; ++c)
      if (seg_of[c] >= 0) {
        const float s = slot_vec(i, c).sum_of_squares();
        acc[0] += seg_of[c] == 0 ? s : 0.f;
        acc[1] += seg_of[c] == 1 ? s : 0.f;
      }
#pragma unroll
    for (int s = 0; s < ARMS_MAX_SEGMENTS; ++s)
      if (s < p.num_segments) {
        const float v = platform::warp_sum(acc[s]);
        if (lane == 0) warp_partial[i % slots][warp][s] = v;
      }
  };

  // Warp 0 only (its warp partials are visible: written before an earlier barrier). Lanes
  // [s*group, (s+1)*group) serve segment s; lane s*group + r talks to rank r.
  const int lamport_seg = tid / group;
  const int lamport_peer = tid % group;
  auto publish = [&](int i) {
    if constexpr (MODE == ARMS_MODE_LAMPORT) {
      const LamportParams& lp = p.lamport;
      if (!failed && lamport_seg < p.num_segments && lamport_peer < lp.nranks && lamport_peer != lp.rank)
        send_partial(lp, slot, token_of(i), lamport_seg, block_partial(i, lamport_seg), lamport_peer);
    }
  };
  auto collect = [&](int d) {
    if (warp != 0) return;
    if constexpr (MODE == ARMS_MODE_LAMPORT) {
      const LamportParams& lp = p.lamport;
      const bool active = lamport_seg < p.num_segments && lamport_peer < lp.nranks;
      float v = 0.f;
      if (active) {
        const float partial = block_partial(d, lamport_seg);
        v = failed ? __int_as_float(0x7fc00000)
                   : receive_partial(lp, slot, epoch, token_of(d), lamport_seg, p.tokens, partial, lamport_peer);
      }
      // Every rank adds the same N values in rank order: identical bits everywhere.
      const int first = lane - lamport_peer;
      float total = 0.f;
      for (int q = 0; q < lp.nranks; ++q) total += platform::warp_shfl(v, first + q);
      if (active && lamport_peer == 0) row_scale[d % slots][lamport_seg] = rsqrtf(total * inv_width(lamport_seg) + p.eps);
    } else {
      if (tid < p.num_segments) row_scale[d % slots][tid] = rsqrtf(block_partial(d, tid) * inv_width(tid) + p.eps);
    }
  };

  auto normalize = [&](int d) {
    const int t = token_of(d);
#pragma unroll
    for (int c = 0; c < VPT; ++c)
      if (seg_of[c] >= 0) {
        const KernelSegment& g = seg_of[c] == 0 ? p.seg[0] : p.seg[1];
        const float scale = row_scale[d % slots][seg_of[c]];
        float w[VEC];
        if constexpr (kCacheWeights) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) w[e] = weight[c][e];
        } else {
          load_weight<VEC>(g.weight, g.weight_dtype, col[c], w);
        }
        const V x = slot_vec(d, c);
        V y;
#pragma unroll
        for (int e = 0; e < VEC; ++e) y.set(e, x.get(e) * scale * w[e]);
        y.store(static_cast<S*>(g.out) + t * g.out_stride + col[c]);
      }
  };

  for (int i = 0; i < ntokens + lag; ++i) {  // the same trip count for every thread of the block
    const int d = i - lag;
    if (i < ntokens) reduce(i);
    if (d >= 0) collect(d);
    __syncthreads();
    if (i < ntokens) publish(i);
    if (d >= 0) normalize(d);
    issue_load(i + P);
  }

  if constexpr (MODE == ARMS_MODE_LAMPORT) {
    if (!failed) finish_launch(p.lamport, epoch, p.tokens);
  }
}

}  // namespace arms

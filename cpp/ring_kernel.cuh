// The prefill kernel of the fused (LAMPORT) op on sm_90: rows staged through a ring of
// shared-memory buffers by bulk (TMA) copies.
//
// Why: norm_kernel keeps a row in registers from load to store, so a block has at most two rows
// in flight, and at prefill its 2-warp blocks are bound by registers (8 per SM on an H200). Its
// trace (benchmarks/results/trace-H200-tp2.json) shows the reads of a launch done before most
// writes start, and blocks ending microseconds apart. Here one thread asks the copy engine for a
// whole row with one instruction per segment, so a block keeps ring_rows rows in flight in shared
// memory, and the exchange of a row overlaps the loads of the rows after it.
//
// Per block, rows t_k = blockIdx.x + k * gridDim.x, k = 0 .. n - 1; step k of the loop:
//   1. wait for row k's bytes (mbarrier of buffer k % ring_rows), reduce it (block_partials:
//      one __syncthreads) and send its partials to the peers;
//   2. right after that barrier, every thread has finished step k - 1, so the buffer of row
//      k - 1 - lag is free: thread 0 asks for row k - 1 - lag + ring_rows into it;
//   3. row j = k - lag: wait for the peers' partials (exchanged_sums), read the row from its
//      buffer again, normalize it and store it to global memory.
// Then lag more steps without step 1 store the last rows. So lag + 1 rows are held for the
// exchange and ring_rows - lag - 1 are on their way from memory at any time.
//
// Why it cannot deadlock: every block of the grid is co-resident (the launcher's grid), and a
// block waits only on rows it has sent; its rank's other blocks and its peers send rows in the
// same order (k up), waiting only on rows they have sent themselves, so the smallest row anyone
// waits on has been sent by everyone. The exchange itself is lamport.cuh's, unchanged: packets are
// indexed by token, bounded spins, NaN on timeout, no clearing.
#pragma once

#include "norm_kernel.cuh"

#if defined(ARMS_HAS_BULK_COPY)

namespace arms {

constexpr int kRingMaxRows = 32;  // buffers of one block's ring (KernelParams::ring_rows)
constexpr int kRingMaxVpt = 4;    // 16-byte vectors per thread: rows up to 4 * 512 vectors (32 KiB)

// Dynamic shared memory of one block: the mbarriers, then the row buffers (16-byte aligned).
__host__ __device__ inline int ring_header_bytes() { return kRingMaxRows * 8; }
__host__ __device__ inline int ring_shared_bytes(int ring_rows, int row_vecs) {
  return ring_header_bytes() + ring_rows * row_vecs * 16;
}

// Ask the copy engine for row `token` (every segment) into `buffer`, counted on `full`.
template <class S>
__device__ __forceinline__ void ring_load_row(const KernelParams& p, int token, uint4* buffer, uint64_t* full) {
  platform::mbarrier_arrive_expect_bytes(full, static_cast<uint32_t>(p.row_vecs) * 16u);
  int at = 0;
  for (int s = 0; s < p.num_segments; ++s) {
    const KernelSegment& g = segment(p, s);
    platform::bulk_load_to_shared(buffer + at, static_cast<const S*>(g.in) + static_cast<int64_t>(token) * g.in_stride,
                                  static_cast<uint32_t>(g.vecs) * 16u, full);
    at += g.vecs;
  }
}

// This thread's vectors of a staged row (vector i at column threadIdx.x + i * blockDim.x).
template <class D, int VEC, int VPT>
__device__ __forceinline__ void read_staged_row(const ThreadColumns<VEC, VPT>& c, const uint4* buffer,
                                                Vec<D, VEC> (&x)[VPT]) {
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    if (c.seg(i) >= 0) x[i].load(reinterpret_cast<const typename D::storage*>(buffer + c.vector(i)));
}

template <class D, int VPT>
__global__ void __launch_bounds__(kMaxBlockThreads) ring_kernel(const KernelParams p) {
  using S = typename D::storage;
  constexpr int VEC = 16 / sizeof(S);
  using V = Vec<D, VEC>;
  extern __shared__ __align__(16) unsigned char ring_shared[];
  uint64_t* full = reinterpret_cast<uint64_t*>(ring_shared);  // [ring_rows]: buffer b's bytes landed
  uint4* buffers = reinterpret_cast<uint4*>(ring_shared + ring_header_bytes());
  __shared__ float2 warp_sums[2][kMaxGroupWarps];
  // [k % ring_rows][warp]: this rank's partials of row k, kept by the one lane of each warp that
  // adds them in exchanged_sums (lane == rank), which alone writes and reads its cell: no barrier
  // needed, also in the last lag steps, which have none.
  __shared__ float2 own_partials[kRingMaxRows][kMaxGroupWarps];
  __shared__ uint32_t epoch_words[2];

  const bool tracing = p.lamport.trace != nullptr && blockIdx.x == 0 && threadIdx.x == 0;
  const uint64_t entered = tracing ? platform::timer_ns() : 0;
  const ThreadColumns<VEC, VPT> c = thread_columns<VEC, VPT>(p);
  const int lane = threadIdx.x % platform::kWarpSize;
  const int warp = threadIdx.x / platform::kWarpSize;
  const int grid = static_cast<int>(gridDim.x);
  const int ring = p.ring_rows;
  const int lag = p.ring_lag;
  const int rows = static_cast<int>(blockIdx.x) < p.tokens ? (p.tokens - 1 - static_cast<int>(blockIdx.x)) / grid + 1 : 0;
  auto token_of = [&](int k) { return static_cast<int>(blockIdx.x) + k * grid; };
  auto buffer_of = [&](int k) { return buffers + static_cast<int64_t>(k % ring) * p.row_vecs; };

  // Only shared memory before the PDL wait; read_epoch_per_block's barrier below publishes the
  // initialized mbarriers to the block.
  if (threadIdx.x == 0) {
    for (int b = 0; b < ring; ++b) platform::mbarrier_init(&full[b], 1);
    platform::mbarrier_init_fence();
  }

  platform::pdl_wait();
  platform::pdl_trigger();  // see norm_kernel: the dependents launch once every block is here
  const uint64_t waited = tracing ? platform::timer_ns() : 0;

  if (threadIdx.x == 0)
    for (int k = 0; k < rows && k < ring; ++k) ring_load_row<S>(p, token_of(k), buffer_of(k), &full[k % ring]);

  const Epoch e = read_epoch_per_block(p.lamport, epoch_words);
  uint64_t* trace = nullptr;
  if (tracing) {
    trace = trace_row(p.lamport, e);
    trace[kTraceEntry] = entered;
    trace[kTraceWaited] = waited;
  }
  auto stamp_latest = [&](TracePoint point) {  // a trace build only: see norm_kernel
    if constexpr (ARMS_TRACE_ALL_BLOCKS) {
      if (p.lamport.trace != nullptr && threadIdx.x == 0)
        atomicMax(reinterpret_cast<unsigned long long*>(trace_row(p.lamport, e) + point),
                  static_cast<unsigned long long>(platform::timer_ns()));
    }
  };

  // Weights: loaded once as fp32, kept for every row.
  float weight[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    if (c.seg(i) >= 0) {
      const KernelSegment& g = segment(p, c.seg(i));
      load_weight<VEC>(g.weight, g.weight_dtype, c.col(i), weight[i]);
    }
  auto cached_weight = [&](int i, const KernelSegment&, float(&w)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = weight[i][k];
  };

  float2 partial = make_float2(0.f, 0.f);
  // (experiment) lane r's packet of rank r for row `ahead_row`, loaded one step early
  uint64_t ahead_a = 0, ahead_b = 0;
  int ahead_row = -1;
  const bool skip_poll = (p.ring_debug & 1) != 0, poll_ahead = (p.ring_debug & 2) != 0;
  for (int k = 0; k < rows + lag; ++k) {
    if (k < rows) {
      const int t = token_of(k);
      platform::mbarrier_wait(&full[k % ring], static_cast<uint32_t>(k / ring) & 1u);
      V x[VPT];
      read_staged_row<D, VEC, VPT>(c, buffer_of(k), x);
      partial = block_partials(local_partials<D, VEC, VPT>(c, x), k & 1, warp_sums);
      if (tracing && k == 0) trace[kTraceLoaded] = platform::timer_ns();
      // Past block_partials' barrier every thread has stored row k - 1 - lag: refill its buffer.
      const int refill = k - 1 - lag + ring;
      if (threadIdx.x == 0 && k - 1 - lag >= 0 && refill < rows)
        ring_load_row<S>(p, token_of(refill), buffer_of(refill), &full[refill % ring]);
      if (lane == p.lamport.rank) own_partials[k % ring][warp] = partial;
      if (threadIdx.x < platform::kWarpSize && !e.failed)
        send_partials(p.lamport, e, t, p.num_segments, partial.x, partial.y, lane);
      if (tracing && k == 0) trace[kTraceSent] = platform::timer_ns();
      if (k == 0) stamp_latest(kTraceLastLoaded);
    }
    const int j = k - lag;
    if (j >= 0) {
      const float2 own = lane == p.lamport.rank ? own_partials[j % ring][warp] : partial;  // others: unused
      float2 sums;
      if (skip_poll) {  // (experiment: wrong sums, for timing only)
        sums = make_float2(own.x * p.rank_count, own.y * p.rank_count);
        sums.x = platform::warp_shfl(sums.x, p.lamport.rank);
        sums.y = platform::warp_shfl(sums.y, p.lamport.rank);
      } else {
        sums = sum_in_rank_order(p, receive_partials(p.lamport, e, token_of(j), p.tokens, p.num_segments, own.x, own.y,
                                                     lane, ahead_row == j, ahead_a, ahead_b));
      }
      if (poll_ahead && j + 1 < rows && lane < p.lamport.nranks && lane != p.lamport.rank) {
        const uint64_t* cell = p.lamport.buffers[p.lamport.rank] + packet_index(p.lamport, e.slot, lane, token_of(j + 1));
        if (p.num_segments == 1)
          ahead_a = platform::load_relaxed_sys_u64(cell);
        else
          platform::load_relaxed_sys_u64x2(cell, ahead_a, ahead_b);
        ahead_row = j + 1;
      }
      if (tracing && j == 0) trace[kTraceArrived] = platform::timer_ns();
      const float2 scale = make_float2(rsqrtf(sums.x * p.seg[0].inv_full_width + p.eps),
                                       rsqrtf(sums.y * p.seg[1].inv_full_width + p.eps));
      V x[VPT];
      read_staged_row<D, VEC, VPT>(c, buffer_of(j), x);
      normalize_store<D, VEC, VPT>(p, c, token_of(j), x, scale, cached_weight);
    }
  }

  if (trace) trace[kTraceStored] = platform::timer_ns();
  stamp_latest(kTraceLastStored);
  refresh_stale_packets(p.lamport, e, p.tokens, p.num_segments);
  finish_launch(p.lamport, e);
}

}  // namespace arms

#endif  // ARMS_HAS_BULK_COPY

// The Lamport exchange of per-token statistics between the ranks of one P2P domain.
//
// Each rank owns one buffer of 64-bit packets, laid out as
//     [slot 0..1][source rank 0..N-1][token 0..capacity-1][segment 0..1]
// followed by the probe cells [N] and the floor-probe cells [2][N], and every rank maps every
// peer's buffer. A packet is (flag << 32) | float bits of one partial sum of squares; the flag
// names the launch that wrote it. A launch with epoch e:
//   1. stores its partial of (token, segment) into packet [e % 2][own rank][token][segment] of
//      every peer's buffer, with flag(e);
//   2. polls its own buffer until packet [e % 2][r][token][segment] carries flag(e), for every
//      peer r, and adds the N partials (its own from a register) in rank order;
//   3. advances the epoch (finish_launch).
// Nothing is ever cleared back to a sentinel, and no fence separates the steps:
// - Why the value needs no fence: a packet is one aligned 64-bit store, single-copy atomic, so
//   a reader that sees flag(e) sees the partial written with it.
// - Why two slots suffice: while this rank runs launch e, a peer may already run launch e + 1
//   (it got all it needed from us) and write slot (e + 1) % 2. No peer can write launch e + 2's
//   packets into slot e % 2 before it has our launch e + 1 packets, and we send those only after
//   launch e has finished (the next launch starts with pdl_wait / stream order).
// - Why a stale packet is never taken for a fresh one: slot e % 2 last held packets of launch
//   e - 2 or older, whose flags differ from flag(e). Flags have 31 bits of epoch, and every
//   2^28 launches (kRefreshMask) a launch zeroes the packets of its slot that it does not wait
//   for (tokens >= T, and segment 1 of a one-segment launch), so no packet lives long enough for
//   its flag to come round again. Zero is never a flag (flags have the top bit set), so a zeroed
//   or never-written packet never matches.
// - Why all ranks agree bit for bit: every rank adds the same N partials in the same order.
#pragma once

#include "backend_api.h"
#include "platform.h"
#include "vec.cuh"

namespace arms {

constexpr int kSlots = 2;
constexpr int kPacketsPerToken = ARMS_MAX_SEGMENTS;
constexpr uint32_t kEpochMask = 0x7fffffffu;    // epochs count modulo 2^31 ...
constexpr uint32_t kFlagBit = 0x80000000u;      // ... and flags set the top bit, so 0 is no flag
constexpr uint32_t kRefreshMask = (1u << 28) - 1u;  // launches with (e & mask) < 2 zero stale packets
constexpr int kTracePoints = 8;                 // uint64 timestamps per traced launch

// Epochs live in one cell per block index, not in one word that every block reads, so no block
// waits for another before the epoch moves on (see read_epoch and finish_launch; side by side on
// 2x H200, history/trace-H200-tp2-epoch-cells-ab.json: T = 8 3.43 against 3.56 us, T = 64 3.77
// against 3.84-3.94, T = 1024 6.31 against 6.43). Grids are clamped to kEpochCells blocks
// (norm_launch.cu).
constexpr int kEpochCells = 2048;

// Device-resident state of one rank's workspace, advanced by the kernel itself so that a CUDA
// graph replays with no host work.
struct ControlBlock {
  uint32_t failed;       // sticky: a spin timed out; every later launch outputs NaN and exits
  uint32_t floor_epoch;  // the floor probe's own epoch (floor_exchange_kernel)
  // epoch_cells[i]: launches completed on this workspace, modulo 2^31 (slot = epoch % 2). Every
  // launch writes every cell once (finish_launch), so all cells hold the same epoch between launches.
  uint32_t epoch_cells[kEpochCells];
};

struct LamportParams {
  uint64_t* buffers[ARMS_MAX_RANKS];  // buffers[r]: rank r's packets as mapped here; [rank] is own
  ControlBlock* ctrl;
  ArmsFault* fault;  // host-mapped, so the host reads it without synchronizing the device
  uint64_t* trace;   // optional [trace_depth][kTracePoints] timestamps, of block 0 (and in a trace build of every block: norm_kernel)
  int32_t trace_depth;
  int32_t rank;
  int32_t nranks;
  int32_t capacity;  // tokens per slot
  int32_t op;
  int64_t timeout_ns;
};

__host__ __device__ inline int64_t slot_packets(int nranks, int capacity) {
  return static_cast<int64_t>(nranks) * capacity * kPacketsPerToken;
}
__host__ __device__ inline int64_t probe_offset(int nranks, int capacity) { return kSlots * slot_packets(nranks, capacity); }
__host__ __device__ inline int64_t floor_offset(int nranks, int capacity) {
  return probe_offset(nranks, capacity) + nranks;
}
__host__ __device__ inline int64_t buffer_packets(int nranks, int capacity) {
  return floor_offset(nranks, capacity) + kSlots * nranks;
}

__device__ __forceinline__ uint32_t flag_of(uint32_t epoch) { return epoch | kFlagBit; }
__device__ __forceinline__ uint64_t make_packet(float partial, uint32_t flag) {
  return (static_cast<uint64_t>(flag) << 32) | float_bits(partial);
}
__device__ __forceinline__ float packet_value(uint64_t packet) { return bits_float(static_cast<uint32_t>(packet)); }
__device__ __forceinline__ uint32_t packet_flag(uint64_t packet) { return static_cast<uint32_t>(packet >> 32); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// What a launch learns from the control block before it exchanges anything.
struct Epoch {
  uint32_t epoch;
  uint32_t flag;
  uint32_t slot;
  bool failed;
};

__device__ __forceinline__ Epoch make_epoch(uint32_t epoch, uint32_t failed) {
  Epoch e;
  e.epoch = epoch;
  e.failed = failed != 0u;
  e.flag = flag_of(e.epoch);
  e.slot = e.epoch % kSlots;
  return e;
}

// Read this launch's epoch from this block's own cell, and the sticky failure word (after
// pdl_wait: the previous launch wrote them; the two loads are in flight together). Why a cell per
// block: with one shared epoch, the last block to read it had to be known before the epoch could
// move on, which took a same-address count from every block and a wait in block 0 at the end.
// Block b's cell is written only by this launch's finish_launch, after the block's last barrier,
// so every warp of the block has read it by then. One lane per warp reads; the others get the
// values by shuffle, so no load of theirs can be late.
__device__ inline Epoch read_epoch(const LamportParams& lp, int lane) {
  uint32_t epoch = 0, failed = 0;
  if (lane == 0) {
    epoch = platform::load_l2(&lp.ctrl->epoch_cells[blockIdx.x]);
    failed = platform::load_l2(&lp.ctrl->failed);
  }
  return make_epoch(__float_as_uint(platform::warp_shfl(__uint_as_float(epoch), 0)),
                    __float_as_uint(platform::warp_shfl(__uint_as_float(failed), 0)));
}

// read_epoch with one reader per block: thread 0 reads, the other threads take the words from
// shared memory after a barrier. Every thread of the block must call it (it has a barrier).
__device__ inline Epoch read_epoch_per_block(const LamportParams& lp, uint32_t (&shared_words)[2]) {
  if (threadIdx.x == 0) {
    shared_words[0] = platform::load_l2(&lp.ctrl->epoch_cells[blockIdx.x]);
    shared_words[1] = platform::load_l2(&lp.ctrl->failed);
  }
  __syncthreads();
  return make_epoch(shared_words[0], shared_words[1]);
}

// This launch's row of the profiler's trace (lp.trace non-null): [kTracePoints] stamps.
__device__ __forceinline__ uint64_t* trace_row(const LamportParams& lp, const Epoch& e) {
  return lp.trace + static_cast<int64_t>(e.epoch % lp.trace_depth) * kTracePoints;
}

__device__ __forceinline__ int64_t packet_index(const LamportParams& lp, uint32_t slot, int source, int token) {
  return (static_cast<int64_t>(slot) * lp.nranks + source) * lp.capacity * kPacketsPerToken +
         static_cast<int64_t>(token) * kPacketsPerToken;
}

// Record the first timeout of this workspace. The host-mapped record is written before its
// `failed` word, with a system fence between, so a host that sees failed != 0 sees the details.
__device__ inline void record_fault(const LamportParams& lp, int peer, uint32_t epoch, int tokens) {
  if (atomicCAS(&lp.ctrl->failed, 0u, 1u) != 0u) return;  // someone else already recorded one
  volatile ArmsFault* f = lp.fault;
  f->op = lp.op;
  f->rank = lp.rank;
  f->peer = peer;
  f->epoch = epoch;
  f->tokens = tokens;
  platform::fence_system();
  f->failed = 1;
  platform::fence_system();
}

// Lane r < N of the sending warp stores this rank's partials of `token` into rank r's buffer.
// Every lane holds the same bits of the block's partials (the xor butterflies of block_partials
// leave the identical sum in every lane), so what rank r receives from lane r is exactly what
// this rank adds for itself from lane `rank`: the ranks' totals agree bit for bit.
// Adding +0.0 is not needed here (the flag, not the value, marks a packet as written).
__device__ inline void send_partials(const LamportParams& lp, const Epoch& e, int token, int nseg, float p0, float p1,
                                     int lane) {
  if (lane >= lp.nranks || lane == lp.rank) return;
  uint64_t* cell = lp.buffers[lane] + packet_index(lp, e.slot, lp.rank, token);
  if (nseg == 1)
    platform::store_relaxed_sys_u64(cell, make_packet(p0, e.flag));
  else
    platform::store_relaxed_sys_u64x2(cell, make_packet(p0, e.flag), make_packet(p1, e.flag));
}

// Lane r < N waits for rank r's partials of `token` (its own rank's from p0/p1 without a round
// trip); other lanes return zeros. Bounded: on timeout the lane records the fault and returns
// NaN, which poisons the row, so a timed-out launch never produces a plausible wrong answer.
// The clock and the shared failure word are read every 32 polls only: each is a round trip that
// would otherwise delay noticing the peer's write.
__device__ inline float2 receive_partials(const LamportParams& lp, const Epoch& e, int token, int tokens, int nseg,
                                          float p0, float p1, int lane) {
  if (lane >= lp.nranks) return make_float2(0.f, 0.f);
  if (lane == lp.rank) return make_float2(p0, p1);
  if (e.failed) return make_float2(quiet_nan(), quiet_nan());
  const uint64_t* cell = lp.buffers[lp.rank] + packet_index(lp, e.slot, lane, token);
  uint64_t a = 0, b = 0;
  auto arrived = [&]() {
    if (nseg == 1) {
      a = platform::load_relaxed_sys_u64(cell);
      return packet_flag(a) == e.flag;
    }
    platform::load_relaxed_sys_u64x2(cell, a, b);
    return packet_flag(a) == e.flag && packet_flag(b) == e.flag;
  };
  if (!arrived()) {
    const uint64_t start = platform::timer_ns();
    for (uint32_t polls = 1; !arrived(); ++polls) {
      if (polls % 32 != 0) continue;
      // Another thread timed out: stop now instead of waiting out our own full timeout.
      if (platform::load_relaxed_sys(&lp.ctrl->failed) != 0u) return make_float2(quiet_nan(), quiet_nan());
      if (platform::timer_ns() - start > static_cast<uint64_t>(lp.timeout_ns)) {
        record_fault(lp, lane, e.epoch, tokens);
        return make_float2(quiet_nan(), quiet_nan());
      }
    }
  }
  return make_float2(packet_value(a), nseg == 1 ? 0.f : packet_value(b));
}

// Zero every packet of this launch's slot that it does not wait for (tokens >= T, and the second
// segment's packets of a one-segment launch), on the rare launches that kRefreshMask picks, so
// that no packet outlives its flag's wrap-around. Safe at any point of launch e: peers write this
// slot of our buffer only in launch e (tokens < T, segments < nseg: left alone here) and e + 2
// (after our launch e + 1 has started, so after this launch has ended).
__device__ inline void refresh_stale_packets(const LamportParams& lp, const Epoch& e, int tokens, int nseg) {
  if ((e.epoch & kRefreshMask) >= 2u) return;
  const int64_t per_source = static_cast<int64_t>(lp.capacity) * kPacketsPerToken;
  uint64_t* slot = lp.buffers[lp.rank] + packet_index(lp, e.slot, 0, 0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_source * lp.nranks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t in_source = i % per_source;
    if (in_source / kPacketsPerToken >= tokens || in_source % kPacketsPerToken >= nseg) slot[i] = 0u;
  }
}

// Move the epoch on: block b writes cells b, b + B, b + 2B, ... (B blocks in the grid), so every
// cell is written exactly once per launch and the next launch, whatever its grid, finds the new
// epoch in the cell of each of its blocks. No fence, no atomic and no wait for the other blocks:
// the next launch reads its cells only after this grid has completed (pdl_wait / stream order),
// which makes every write of this grid visible to it, and no block of this launch reads a cell
// another block writes. Nothing is loaded here: a load puts a round trip to L2 between the
// block's last store and its exit (a version that read `failed` here to carry it in the cells
// came out 0.26 us slower at T = 1 and 0.43 at T = 1024 than the shared epoch it replaced, in one
// 2x H200 run). Every thread of the block must call it.
__device__ inline void finish_launch(const LamportParams& lp, const Epoch& e) {
  __syncthreads();  // every warp of the block has read its cell
  const uint32_t stride = gridDim.x;
  const uint32_t next = (e.epoch + 1u) & kEpochMask;
  for (uint32_t i = blockIdx.x + threadIdx.x * stride; i < static_cast<uint32_t>(kEpochCells); i += blockDim.x * stride)
    lp.ctrl->epoch_cells[i] = next;
}

}  // namespace arms

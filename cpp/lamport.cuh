// The Lamport exchange of per-token statistics between the ranks of one P2P domain.
//
// Each rank owns one buffer of uint32 cells, laid out as
//     [slot 0..2][source rank 0..N-1][token 0..capacity-1][segment 0..1]   then   [probe 0..N-1]
// and every rank holds a mapping of every peer's buffer. A launch with epoch e uses slot e % 3:
//   1. it stores its own partial sum for (token, segment) into cell [slot][own rank][token][seg]
//      of every peer's buffer;
//   2. it spins on its own buffer until cell [slot][r][token][seg] is no longer the sentinel
//      -0.0, for every peer r, and adds the N values (its own from a register) in rank order;
//   3. it resets slot (e - 1) % 3, which the previous launch used, back to the sentinel.
// Why three slots: while this rank runs launch e, a peer may already run launch e + 1 (it got
// all it needed from us) and write into slot e + 1 of our buffer, but no peer can reach launch
// e + 2 before we finish launch e + 1. So slot e - 1 == e + 2 is written by nobody while we clear it.
// Why no fences around the data: every cell is its own flag. A 32-bit store is single-copy
// atomic, so a reader sees either the sentinel or the whole value, and the writer turns a partial
// of -0.0 into +0.0 so that a real value is never mistaken for the sentinel.
// Why all ranks agree bit for bit: every rank adds the same N cells in the same order.
#pragma once

#include "backend_api.h"
#include "platform.h"
#include "vec.cuh"

namespace arms {

constexpr int kSlots = 3;
constexpr uint32_t kEmptyCell = 0x80000000u;  // -0.0f, the "not yet written" sentinel
constexpr int kCellsPerToken = ARMS_MAX_SEGMENTS;

// Device-resident state of one rank's workspace, advanced by the kernel itself so that a CUDA
// graph replays with no host work.
struct ControlBlock {
  uint32_t epoch;        // launches completed on this workspace; slot = epoch % 3
  uint32_t prev_tokens;  // tokens the previous launch used: what this launch must clear
  uint32_t blocks_done;  // blocks of the running launch that finished (last one advances epoch)
  uint32_t failed;       // sticky: a spin timed out; every later launch outputs NaN and exits
};

struct LamportParams {
  uint32_t* buffers[ARMS_MAX_RANKS];  // buffers[r]: rank r's cells as mapped here; [rank] is own
  ControlBlock* ctrl;
  ArmsFault* fault;  // host-mapped, so the host reads it without synchronizing the device
  int32_t rank;
  int32_t nranks;
  int32_t capacity;  // tokens per slot
  int32_t op;
  int64_t timeout_ns;
};

__host__ __device__ inline int64_t slot_cells(int nranks, int capacity) {
  return static_cast<int64_t>(nranks) * capacity * kCellsPerToken;
}
__host__ __device__ inline int64_t probe_offset(int nranks, int capacity) { return kSlots * slot_cells(nranks, capacity); }
__host__ __device__ inline int64_t buffer_cells(int nranks, int capacity) {
  return probe_offset(nranks, capacity) + nranks;
}
__device__ inline int64_t cell_index(const LamportParams& lp, uint32_t slot, int source, int token, int segment) {
  return slot * slot_cells(lp.nranks, lp.capacity) + (static_cast<int64_t>(source) * lp.capacity + token) * kCellsPerToken +
         segment;
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

// Spin until a peer's cell is written, bounded by the workspace timeout. A NaN return poisons
// the row, so a timed-out launch can never produce a plausible-looking wrong answer. The clock
// and the shared failure flag are read every 32 polls only: each read is a round trip that would
// otherwise delay noticing the peer's write.
__device__ inline float wait_for_cell(const LamportParams& lp, const uint32_t* cell, int peer, uint32_t epoch,
                                      int tokens) {
  uint32_t bits = platform::load_relaxed_sys(cell);
  if (bits != kEmptyCell) return bits_float(bits);
  const uint64_t start = platform::timer_ns();
  for (uint32_t polls = 1;; ++polls) {
    bits = platform::load_relaxed_sys(cell);
    if (bits != kEmptyCell) return bits_float(bits);
    if (polls % 32 != 0) continue;
    // Another thread timed out: stop now instead of waiting out our own full timeout.
    if (platform::load_relaxed_sys(&lp.ctrl->failed) != 0u) return __int_as_float(0x7fc00000);
    if (platform::timer_ns() - start > static_cast<uint64_t>(lp.timeout_ns)) {
      record_fault(lp, peer, epoch, tokens);
      return __int_as_float(0x7fc00000);
    }
  }
}

// The lanes of a group of next_pow2(N) consecutive lanes serve one (token, segment) cell: lane r
// sends this rank's partial to rank r (send_partial) and later waits for rank r's partial
// (receive_partial), so the N sends and the N waits each overlap. The caller adds the group's
// values in rank order.
__device__ inline void send_partial(const LamportParams& lp, uint32_t slot, int token, int segment, float partial,
                                    int r) {
  // -0.0 is the sentinel; adding +0.0 turns -0.0 into +0.0 and leaves everything else unchanged.
  platform::store_relaxed_sys(lp.buffers[r] + cell_index(lp, slot, lp.rank, token, segment), float_bits(partial + 0.0f));
}

// Rank r's partial of the cell (this rank's own one without a round trip).
__device__ inline float receive_partial(const LamportParams& lp, uint32_t slot, uint32_t epoch, int token, int segment,
                                        int tokens, float partial, int r) {
  if (r == lp.rank) return partial + 0.0f;  // the same bits the peers received
  return wait_for_cell(lp, lp.buffers[lp.rank] + cell_index(lp, slot, r, token, segment), r, epoch, tokens);
}

// Reset the cells the previous launch used to the sentinel. Run by the whole grid at the start
// of a launch; plain stores suffice: they are complete when this kernel ends, and no peer can
// write these cells before this rank has finished its next launch (see the slot argument above).
__device__ inline void clear_previous_slot(const LamportParams& lp, uint32_t epoch, uint32_t prev_tokens) {
  if (prev_tokens == 0) return;
  uint32_t* own = lp.buffers[lp.rank];
  const uint32_t prev_slot = (epoch + kSlots - 1) % kSlots;
  // Cells per source are contiguous; capacity is even, so each run starts 16-byte aligned and
  // rounding the run up to whole uint4 words stays inside the source's region.
  const int64_t words_per_source = (static_cast<int64_t>(prev_tokens) * kCellsPerToken + 3) / 4;
  const int64_t total = words_per_source * lp.nranks;
  const uint4 empty = make_uint4(kEmptyCell, kEmptyCell, kEmptyCell, kEmptyCell);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t source = i / words_per_source;
    const int64_t word = i % words_per_source;
    uint32_t* run = own + cell_index(lp, prev_slot, static_cast<int>(source), 0, 0);
    reinterpret_cast<uint4*>(run)[word] = empty;
  }
}

// The last block to finish advances the epoch. Every block read the control words at its start
// and fenced before counting itself done, so no block can still read the old epoch after it moves.
// A one-block launch (decode) skips the counter: it is its own last block.
__device__ inline void finish_launch(const LamportParams& lp, uint32_t epoch, int tokens) {
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (gridDim.x == 1) {
    lp.ctrl->prev_tokens = static_cast<uint32_t>(tokens);
    lp.ctrl->epoch = epoch + 1;
    return;
  }
  __threadfence();
  if (atomicAdd(&lp.ctrl->blocks_done, 1u) == gridDim.x - 1) {
    lp.ctrl->prev_tokens = static_cast<uint32_t>(tokens);
    lp.ctrl->blocks_done = 0;
    __threadfence();
    lp.ctrl->epoch = epoch + 1;
  }
}

}  // namespace arms

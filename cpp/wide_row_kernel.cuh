// The wide-row kernel: rows that the register-resident norm_kernel cannot hold.
//
// norm_kernel keeps a token's row in registers from load to store, so a block holds at most
// 512 threads x 8 vectors (32768 16-bit elements, 16384 fp32; 4096 on its unaligned scalar
// path). The launcher picks this kernel only for rows beyond that (or rows it cannot take on
// its vector path), so the common widths keep norm_kernel and its speed. It computes the same
//
//   sum_sq[t, s] = sum over ranks of sum_j x_s[t, j]^2      (fp32)
//   out_s[t, j]  = x_s[t, j] * rsqrt(sum_sq[t, s] / full_width_s + eps) * w_s[j]
//
// in every mode (ArmsMode: LOCAL, STATS_OUT, STATS_IN, LAMPORT) with the same KernelParams.
//
// It also computes every norm variant (ArmsVariantFlags, backend_api.h; the launcher sends every
// call that uses one here): a gate before the statistic (x * act(gate)) or after the norm, a
// weight offset, the Hugging Face rounding (weight_in_input_dtype), groups of columns inside one
// rank (groups_in_row: each group a kernel row of its own), and a statistic over a group of ranks
// (rank_first / rank_count). The formulas and their rounding order are those of
// allreduce_rms.fallback.normalize_variant; the gate's activation is the device's (fast-math expf
// and division on CUDA), so gated results can differ from torch's by a few fp32 ulps, which can
// flip the last bit of a 16-bit output (tests/test_variants_hf.py bounds both).
//
// Work layout: one block is one token at a time; a block walks t = blockIdx.x, + gridDim.x, ...
// (the grid clamped by the launcher to co-resident blocks, as for norm_kernel). Per token:
//   pass 1  row_sum_of_squares: walk each segment's row in column chunks, accumulating fp32
//           sums of squares; block_partials reduces them to the block's (this rank's) partials;
//   publish + exchange: exactly norm_kernel's (send_partials / exchanged_sums of lamport.cuh,
//           with their bounded waits and NaN poisoning; the epoch handled by read_epoch and
//           finish_launch): no second protocol;
//   pass 2  normalize_row: re-read the row (just read, so mostly from L2), normalize, store.
// In place (out == in) stays right: pass 1 only reads, and in pass 2 each element is read and
// then written by the same thread, with no other thread touching it.
//
// Alignment: a row (of one segment, of one token) is split at the 16-byte boundaries of its
// *input*: a head of fewer than VEC elements before the first boundary, a middle of whole
// 16-byte vectors, and a tail of fewer than VEC elements; head and tail use element accesses.
// The output and the weight get 16-byte accesses where they are aligned at the same columns,
// element accesses otherwise (a uniform branch per row). Every column belongs to exactly one
// thread, in an order fixed by the row's width and its input's address, so the same inputs give
// the same bits; the ranks' totals agree bit for bit as in norm_kernel (every rank adds the same
// N partials in rank order).
#pragma once

#include "backend_api.h"
#include "lamport.cuh"
#include "norm_kernel.cuh"
#include "platform.h"
#include "vec.cuh"

namespace arms {

constexpr int kWideRowThreads = kMaxBlockThreads;  // the default block (the launcher may override)
constexpr int kWideRowUnroll = 4;                  // 16-byte loads in flight per thread per step

// One segment of one row, split at the 16-byte boundaries of its input (see the file comment).
struct RowSplit {
  int head;        // elements [0, head): before the first 16-byte boundary, element accesses
  int vecs;        // whole VEC-element vectors in [head, tail)
  int tail;        // elements [tail, width): after the last whole vector, element accesses
  int width;
};

template <class D, int VEC>
__device__ __forceinline__ RowSplit row_split(const typename D::storage* row, int width) {
  // The launcher checks that every pointer and row stride is a whole number of elements, so the
  // distance to the next 16-byte boundary is too.
  const int to_boundary = static_cast<int>((16u - (reinterpret_cast<uintptr_t>(row) & 15u)) & 15u);
  const int head = min(to_boundary / static_cast<int>(sizeof(typename D::storage)), width);
  const int vecs = (width - head) / VEC;
  return RowSplit{head, vecs, head + vecs * VEC, width};
}

// Kernel row t of a segment: token t, or with groups_in_row = G > 1, group t % G of token t / G
// (G groups of g.vecs columns side by side). Returns the element offset of that row in a tensor of
// row stride `stride`; the group's first column (of the weight) goes to *group_col.
__device__ __forceinline__ int64_t row_offset(const KernelSegment& g, int t, int64_t stride, int64_t* group_col) {
  if (g.groups_in_row == 1) {
    *group_col = 0;
    return static_cast<int64_t>(t) * stride;
  }
  const int token = t / g.groups_in_row;
  *group_col = static_cast<int64_t>(t - token * g.groups_in_row) * g.vecs;
  return static_cast<int64_t>(token) * stride + *group_col;
}

template <class D>
__device__ __forceinline__ const typename D::storage* input_row(const KernelSegment& g, int token) {
  int64_t col;
  return static_cast<const typename D::storage*>(g.in) + row_offset(g, token, g.in_stride, &col);
}

template <class D>
__device__ __forceinline__ typename D::storage* output_row(const KernelSegment& g, int token) {
  int64_t col;
  return static_cast<typename D::storage*>(g.out) + row_offset(g, token, g.out_stride, &col);
}

// The gate row of kernel row t (as bytes: the gate has its own dtype), or null without a gate.
__device__ __forceinline__ const void* gate_row(const KernelSegment& g, int token) {
  if (!(g.flags & (ARMS_GATE_BEFORE | ARMS_GATE_AFTER))) return nullptr;
  int64_t col;
  const int bytes = g.gate_dtype == ARMS_F32 ? 4 : 2;
  return static_cast<const char*>(g.gate) + row_offset(g, token, g.gate_stride, &col) * bytes;
}

// act(gate) in float32: silu(v) = v / (1 + e^-v), or sigmoid(v) = 1 / (1 + e^-v) (torch's formulas;
// the CUDA build's fast math makes expf and the division the device's approximate ones, so the
// activation can differ from torch's by a few ulps: tests/test_variants_hf.py measures the result).
__device__ __forceinline__ float gate_activation(float v, int flags) {
  const float d = 1.f + expf(-v);
  return (flags & ARMS_GATE_SIGMOID) ? 1.f / d : v / d;
}

// v rounded to a storage dtype (an ArmsDType) and back to float32.
__device__ __forceinline__ float round_to(int dtype, float v) {
  if (dtype == ARMS_BF16) return BF16::to_float(BF16::from_float(v));
  if (dtype == ARMS_F16) return F16::to_float(F16::from_float(v));
  return v;
}

// One output element of the variants: n = x * scale (x already gated when the gate comes first),
// w the weight as read, a = act(gate) (for a gate after the norm). Plain RMSNorm (no flags,
// offset 0) is n * w, as in norm_kernel.
template <class D>
__device__ __forceinline__ float variant_output(const KernelSegment& g, float n, float w, float a) {
  if (g.weight_offset != 0.f) w += g.weight_offset;  // (as the torch path: a -0 weight stays -0)
  if (!(g.flags & ARMS_WEIGHT_IN_INPUT_DTYPE)) {
    const float y = n * w;
    return (g.flags & ARMS_GATE_AFTER) ? y * a : y;
  }
  // Hugging Face's rounding: each factor rounded to its dtype, each product exact in float32
  // and rounded once (as a half-precision multiply in torch is)
  const float y = round_to(D::code, round_to(D::code, w) * round_to(D::code, n));
  return (g.flags & ARMS_GATE_AFTER) ? round_to(D::code, round_to(g.gate_dtype, a) * y) : y;
}

__device__ __forceinline__ bool aligned16_at(const void* base, int64_t col, int elem_bytes) {
  return ((reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(col * elem_bytes)) & 15u) == 0;
}

// Weights of columns [col, col + N) as floats: one vector access when `aligned` (the caller
// checked the address of the first column; later columns keep it, N weights at a time), else N
// element accesses.
template <int N>
__device__ __forceinline__ void load_weight_at(const void* base, int dtype, int64_t col, bool aligned, float (&w)[N]) {
  if (aligned) {
    load_weight<N>(base, dtype, col, w);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) load_weight<1>(base, dtype, col + k, &w[k]);
  }
}

// row_sum_of_squares with a gate before the norm: the squares of x * act(gate). The gate row has
// its own dtype and alignment: vector reads where it is aligned at the row's first middle column.
template <class D, int VEC>
__device__ __forceinline__ float gated_row_sum_of_squares(const typename D::storage* row, const RowSplit& s,
                                                          const void* gate, int gate_dtype, int flags) {
  const bool gate_vector = aligned16_at(gate, s.head, gate_dtype == ARMS_F32 ? 4 : 2);
  float acc = 0.f;
  for (int j = threadIdx.x; j < s.vecs; j += blockDim.x) {
    Vec<D, VEC> x;
    x.load(row + s.head + j * VEC);
    float a[VEC];
    load_weight_at<VEC>(gate, gate_dtype, s.head + j * VEC, gate_vector, a);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = x.get(k) * gate_activation(a[k], flags);
      acc = fmaf(v, v, acc);
    }
  }
  auto edge = [&](int col) {
    float a[1];
    load_weight<1>(gate, gate_dtype, col, a);
    const float v = D::to_float(row[col]) * gate_activation(a[0], flags);
    acc = fmaf(v, v, acc);
  };
  if (static_cast<int>(threadIdx.x) < s.head) edge(threadIdx.x);
  if (s.tail + static_cast<int>(threadIdx.x) < s.width) edge(s.tail + threadIdx.x);
  return acc;
}

// This thread's fp32 sum of squares of one segment's row (pass 1). The middle goes in steps of
// kWideRowUnroll vectors per thread (loads first, then the math, so the loads overlap), each into
// its own accumulator; the head and tail elements, fewer than VEC each, one per thread. With a
// gate before the norm (gate non-null), the squares are of x * act(gate).
template <class D, int VEC>
__device__ __forceinline__ float row_sum_of_squares(const typename D::storage* row, const RowSplit& s,
                                                    const void* gate, int gate_dtype, int flags) {
  if (gate) return gated_row_sum_of_squares<D, VEC>(row, s, gate, gate_dtype, flags);
  float acc[kWideRowUnroll] = {};
  const int step = kWideRowUnroll * static_cast<int>(blockDim.x);
  for (int j0 = threadIdx.x; j0 < s.vecs; j0 += step) {
    Vec<D, VEC> x[kWideRowUnroll];
#pragma unroll
    for (int u = 0; u < kWideRowUnroll; ++u) {
      const int j = j0 + u * static_cast<int>(blockDim.x);
      if (j < s.vecs) x[u].load(row + s.head + j * VEC);
    }
#pragma unroll
    for (int u = 0; u < kWideRowUnroll; ++u) {
      const int j = j0 + u * static_cast<int>(blockDim.x);
      if (j < s.vecs) acc[u] += x[u].sum_of_squares();
    }
  }
  float edges = 0.f;
  if (static_cast<int>(threadIdx.x) < s.head) {
    const float v = D::to_float(row[threadIdx.x]);
    edges = v * v;
  }
  if (s.tail + static_cast<int>(threadIdx.x) < s.width) {
    const float v = D::to_float(row[s.tail + threadIdx.x]);
    edges = fmaf(v, v, edges);
  }
  float total = edges;
#pragma unroll
  for (int u = 0; u < kWideRowUnroll; ++u) total += acc[u];
  return total;
}

// Pass 2 of a row with a variant (see variant_output): x re-read from `in`, the gate from `gate`
// (null without one), weights from column w_col on; element by element in the middle too, where
// the gate's and the weight's alignment may differ from the input's.
template <class D, int VEC>
__device__ __forceinline__ void normalize_variant_row(const KernelSegment& g, const typename D::storage* in,
                                                      typename D::storage* out, const void* gate, int64_t w_col,
                                                      const RowSplit& s, float scale) {
  const bool before = g.flags & ARMS_GATE_BEFORE;
  for (int col = threadIdx.x; col < s.width; col += blockDim.x) {
    float w[1], a[1] = {0.f};
    load_weight<1>(g.weight, g.weight_dtype, w_col + col, w);
    if (gate) {
      load_weight<1>(gate, g.gate_dtype, col, a);
      a[0] = gate_activation(a[0], g.flags);
    }
    const float x = before ? D::to_float(in[col]) * a[0] : D::to_float(in[col]);
    out[col] = D::from_float(variant_output<D>(g, x * scale, w[0], a[0]));
  }
}

// Pass 2: out = x * scale * w over one segment's row, x re-read from `in` (L2, mostly).
template <class D, int VEC>
__device__ __forceinline__ void normalize_row(const KernelSegment& g, const typename D::storage* in,
                                              typename D::storage* out, const RowSplit& s, float scale) {
  using S = typename D::storage;
  const int weight_bytes = g.weight_dtype == ARMS_F32 ? 4 : 2;
  // Uniform per row: the output's and the weight's alignment at the first middle column.
  const bool out_vector = aligned16_at(out, s.head, sizeof(S));
  const bool weight_vector = aligned16_at(g.weight, s.head, weight_bytes);
  const int step = kWideRowUnroll * static_cast<int>(blockDim.x);
  for (int j0 = threadIdx.x; j0 < s.vecs; j0 += step) {
    Vec<D, VEC> x[kWideRowUnroll];
#pragma unroll
    for (int u = 0; u < kWideRowUnroll; ++u) {
      const int j = j0 + u * static_cast<int>(blockDim.x);
      if (j < s.vecs) x[u].load(in + s.head + j * VEC);
    }
#pragma unroll
    for (int u = 0; u < kWideRowUnroll; ++u) {
      const int j = j0 + u * static_cast<int>(blockDim.x);
      if (j >= s.vecs) continue;
      const int col = s.head + j * VEC;
      float w[VEC];
      load_weight_at<VEC>(g.weight, g.weight_dtype, col, weight_vector, w);
      Vec<D, VEC> y;
#pragma unroll
      for (int k = 0; k < VEC; ++k) y.set(k, x[u].get(k) * scale * w[k]);
      if (out_vector) {
        y.store(out + col);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[col + k] = y.v[k];
      }
    }
  }
  // Head and tail, one element per thread: the same math as the middle's.
  auto edge = [&](int col) {
    float w[1];
    load_weight_at<1>(g.weight, g.weight_dtype, col, false, w);
    out[col] = D::from_float(D::to_float(in[col]) * scale * w[0]);
  };
  if (static_cast<int>(threadIdx.x) < s.head) edge(threadIdx.x);
  if (s.tail + static_cast<int>(threadIdx.x) < s.width) edge(s.tail + threadIdx.x);
}

// Two blocks per SM (the occupancy hint caps registers at 64 per thread on NVIDIA): rows stream
// through memory here, so warps in flight matter more than registers. At 512 threads and no hint,
// ptxas took 97 registers (one block, 16 warps per SM); with it, a few words of per-launch state
// spill (to L1, touched once per token, not per element).
template <class D, int MODE>
__global__ void __launch_bounds__(kWideRowThreads, 2) wide_row_kernel(const KernelParams p) {
  constexpr int VEC = 16 / sizeof(typename D::storage);
  constexpr bool kSums = MODE != ARMS_MODE_STATS_IN;
  constexpr bool kNormalizes = MODE != ARMS_MODE_STATS_OUT;
  constexpr bool kLamport = MODE == ARMS_MODE_LAMPORT;
  __shared__ float2 warp_sums[2][kMaxGroupWarps];  // [token parity][warp], as in norm_kernel

  const bool tracing = kLamport && p.lamport.trace != nullptr && blockIdx.x == 0 && threadIdx.x == 0;
  const uint64_t entered = tracing ? platform::timer_ns() : 0;
  const int lane = threadIdx.x % platform::kWarpSize;

  // Nothing of the previous kernel in the stream (inputs, workspace state) is read before this.
  platform::pdl_wait();
  // As in norm_kernel: dependents launch once every block has passed this line, and stop at
  // their own pdl_wait() until this grid has finished.
  platform::pdl_trigger();
  const uint64_t waited = tracing ? platform::timer_ns() : 0;

  Epoch e = {};
  uint64_t* trace = nullptr;
  if constexpr (kLamport) {
    e = read_epoch(p.lamport, lane);  // every warp reads its block's cell
    if (tracing) {
      trace = trace_row(p.lamport, e);
      trace[kTraceEntry] = entered;
      trace[kTraceWaited] = waited;
    }
  }

  int parity = 0;  // block_partials' shared buffer of this token; between two uses of one parity
                   // lies the other token's barrier, which every reader of the first has passed
  for (int t = blockIdx.x; t < p.tokens; t += gridDim.x, parity ^= 1) {
    const bool first = t == static_cast<int>(blockIdx.x);
    float2 partial = make_float2(0.f, 0.f);
    if constexpr (kSums) {
      float2 mine = make_float2(0.f, 0.f);
      for (int s = 0; s < p.num_segments; ++s) {
        const KernelSegment& g = segment(p, s);
        const typename D::storage* row = input_row<D>(g, t);
        const void* gate = (g.flags & ARMS_GATE_BEFORE) ? gate_row(g, t) : nullptr;
        const float sum = row_sum_of_squares<D, VEC>(row, row_split<D, VEC>(row, g.vecs), gate, g.gate_dtype, g.flags);
        if (s == 0) {
          mine.x = sum;
        } else {
          mine.y = sum;
        }
      }
      // the same bits in every thread (block_partials' fixed order), so what we send is what we add
      partial = block_partials(mine, parity, warp_sums);
      if (trace && first) trace[kTraceLoaded] = platform::timer_ns();
    }
    if constexpr (kLamport) {
      if (threadIdx.x < platform::kWarpSize && !e.failed)
        send_partials(p.lamport, e, t, p.num_segments, partial.x, partial.y, lane);
      if (trace && first) trace[kTraceSent] = platform::timer_ns();
    }
    if constexpr (MODE == ARMS_MODE_STATS_OUT) {
      if (threadIdx.x == 0) {
        p.stats[static_cast<int64_t>(t) * p.num_segments] = partial.x;
        if (p.num_segments == 2) p.stats[static_cast<int64_t>(t) * 2 + 1] = partial.y;
      }
    }
    if constexpr (kNormalizes) {
      float2 sums = partial;
      if constexpr (kLamport) {
        sums = exchanged_sums(p, e, t, partial);  // NaN if a peer timed out: the row is poisoned
        if (trace && first) trace[kTraceArrived] = platform::timer_ns();
      }
      if constexpr (MODE == ARMS_MODE_STATS_IN) {
        sums.x = p.stats[static_cast<int64_t>(t) * p.num_segments];
        sums.y = p.num_segments == 2 ? p.stats[static_cast<int64_t>(t) * 2 + 1] : 0.f;
      }
      for (int s = 0; s < p.num_segments; ++s) {
        const KernelSegment& g = segment(p, s);
        const typename D::storage* in = input_row<D>(g, t);
        const float scale = rsqrtf((s == 0 ? sums.x : sums.y) * g.inv_full_width + p.eps);
        if (g.flags == 0 && g.weight_offset == 0.f && g.groups_in_row == 1) {
          normalize_row<D, VEC>(g, in, output_row<D>(g, t), row_split<D, VEC>(in, g.vecs), scale);
        } else {
          int64_t w_col;
          row_offset(g, t, 0, &w_col);
          normalize_variant_row<D, VEC>(g, in, output_row<D>(g, t), gate_row(g, t), w_col,
                                        row_split<D, VEC>(in, g.vecs), scale);
        }
      }
    }
  }

  if constexpr (kLamport) {
    if (trace) trace[kTraceStored] = platform::timer_ns();
    refresh_stale_packets(p.lamport, e, p.tokens, p.num_segments);
    finish_launch(p.lamport, e);
  }
}

}  // namespace arms

/* The C ABI between the front module and a backend library (libarms_cuda.so, libarms_hip.so).
 *
 * A backend exports exactly one symbol, arms_backend_api(), which returns a pointer to a static
 * function table. The front module dlopen()s the library on first use, checks abi_version and
 * struct_size, and calls only through the table, so a wheel can carry both backends and load
 * neither until a tensor of that device type arrives. Plain C: no C++ types cross the boundary.
 *
 * Every function returns 0 on success, or a nonzero ArmsStatus; the message for the most recent
 * failure on the calling thread is available from last_error().
 */
#ifndef ARMS_BACKEND_API_H
#define ARMS_BACKEND_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ARMS_BACKEND_ABI_VERSION 6 /* 2: resources(); 3: value+flag packets, plan, trace, floor; 4: variants;
                                     5: plan knobs: L2 prefetch, early weights, epoch read per block;
                                     6: ArmsPlan.prewait_prefetch_rows */
#define ARMS_BACKEND_SYMBOL "arms_backend_api"
#define ARMS_MAX_RANKS 8
#define ARMS_MAX_SEGMENTS 2
#define ARMS_IPC_HANDLE_BYTES 64

typedef enum ArmsStatus {
  ARMS_OK = 0,
  ARMS_INVALID_ARGUMENT = 1, /* the caller's fault: the message names the argument */
  ARMS_RUNTIME_ERROR = 2,    /* the device runtime refused (out of memory, IPC failure, ...) */
  ARMS_PEER_TIMEOUT = 3      /* a workspace recorded a peer that never wrote */
} ArmsStatus;

typedef enum ArmsDType { ARMS_F32 = 0, ARMS_F16 = 1, ARMS_BF16 = 2 } ArmsDType;

/* What one launch does with the per-token statistics of each segment. */
typedef enum ArmsMode {
  ARMS_MODE_LOCAL = 0,     /* sum of squares on this rank only, then normalize (plain RMSNorm) */
  ARMS_MODE_STATS_OUT = 1, /* sum of squares on this rank only, written to stats[T, nseg] */
  ARMS_MODE_STATS_IN = 2,  /* normalize with the (already all-reduced) sums in stats[T, nseg] */
  ARMS_MODE_LAMPORT = 3    /* sums exchanged with every peer through the workspace, then normalize */
} ArmsMode;

typedef enum ArmsOp { ARMS_OP_RMS_NORM = 1, ARMS_OP_QK_NORM = 2 } ArmsOp;

/* ArmsSegment.flags: the norm variants (ABI 4). With n = x * rsqrt(sum_sq / full_width + eps) and
 * w = weight_offset + weight, all float32:
 *   GATE_BEFORE (Mamba2):          x is replaced by x * act(gate) before the statistic;
 *   GATE_AFTER (MiniMax-Text-01):  the output is multiplied by act(gate);
 *   GATE_SIGMOID:                  act = sigmoid (else silu);
 *   WEIGHT_IN_INPUT_DTYPE:         y = rnd(rnd(w) * rnd(n)), and with GATE_AFTER
 *                                  rnd(rnd_gate(act(gate)) * y) (rnd: to the activation dtype,
 *                                  rnd_gate: to the gate's), as Hugging Face's RMSNorms round;
 *                                  else y = rnd(n * w [* act(gate)]), rounded once. */
typedef enum ArmsVariantFlags {
  ARMS_GATE_BEFORE = 1,
  ARMS_GATE_AFTER = 2,
  ARMS_GATE_SIGMOID = 4,
  ARMS_WEIGHT_IN_INPUT_DTYPE = 8
} ArmsVariantFlags;

/* One normalized column range of a row-major [T, *] tensor. in and out may alias (in-place). */
typedef struct ArmsSegment {
  const void* in;
  void* out;
  const void* weight;  /* [width], contiguous, dtype weight_dtype */
  int64_t in_row_stride;  /* elements between consecutive tokens */
  int64_t out_row_stride;
  int32_t width;       /* columns on this rank (of one group when groups_in_row > 1) */
  int32_t full_width;  /* the count the sum of squares is divided by (the full width over all
                        * ranks, a group's width, or a norm_width that leaves out padding) */
  int32_t weight_dtype;
  int32_t flags;       /* ArmsVariantFlags (ABI 4; was reserved, always 0) */
  /* ABI 4: the variants. Zero / NULL / 0.0 / 1 leave a plain RMSNorm. */
  const void* gate;        /* [T, width * groups_in_row] rows of gate_dtype, or NULL */
  int64_t gate_row_stride; /* elements between consecutive tokens of gate */
  int32_t gate_dtype;
  float weight_offset;     /* the output uses weight_offset + weight */
  int32_t groups_in_row;   /* > 1: each row is that many independent groups of `width` columns,
                            * each with its own statistic, weight slice and gate slice (LOCAL,
                            * STATS_OUT and STATS_IN modes; stats then hold one value per group) */
  int32_t reserved;
} ArmsSegment;

typedef struct ArmsNormArgs {
  ArmsSegment segment[ARMS_MAX_SEGMENTS];
  int32_t num_segments; /* 1 (rms_norm) or 2 (qk_norm) */
  int32_t dtype;        /* ArmsDType of every in/out */
  int64_t tokens;
  float eps;
  int32_t mode;  /* ArmsMode */
  int32_t op;    /* ArmsOp, for error messages */
  int32_t device;
  float* stats;  /* [tokens, num_segments] fp32, for STATS_OUT / STATS_IN */
  void* stream;  /* cudaStream_t / hipStream_t */
  /* ABI 4. LAMPORT mode: > 0 when the statistic of a row adds up only the partials of
   * rank_group consecutive ranks (the group holding this rank: a normalization group that
   * covers whole ranks); 0: all ranks. */
  int32_t rank_group;
  int32_t reserved;
} ArmsNormArgs;

/* What a workspace records when a peer never wrote within the timeout. */
typedef struct ArmsFault {
  int32_t failed;      /* 0: healthy */
  int32_t op;          /* ArmsOp that timed out */
  int32_t rank;        /* this rank */
  int32_t peer;        /* the first peer found missing */
  uint32_t epoch;      /* which call on this workspace (0-based) */
  int32_t tokens;
} ArmsFault;

typedef struct ArmsWorkspaceInfo {
  uint32_t epoch;          /* completed fused launches */
  int32_t capacity;        /* tokens per slot */
  int64_t buffer_bytes;    /* device bytes owned by this rank */
  int32_t peers_open;      /* peer mappings currently open */
  int32_t reserved;
} ArmsWorkspaceInfo;

/* What the backend holds process-wide, over every workspace it created: tests compare two
 * snapshots to prove that close() gave everything back. */
typedef struct ArmsBackendResources {
  int64_t workspaces_live;   /* created and not yet destroyed */
  int64_t ipc_mappings_open; /* peer buffers opened through IPC and not closed */
  int64_t device_bytes;      /* Lamport buffers + control blocks owned by live workspaces */
  int64_t reserved;
} ArmsBackendResources;

/* The launch plan the backend picks for a call (recorded by the benchmark). One block is one
 * token group of warps_per_token warps; each thread holds vectors_per_thread vectors of
 * vector_elems elements of a row. */
typedef struct ArmsPlan {
  int32_t warps_per_token;
  int32_t vectors_per_thread;
  int32_t vector_elems; /* 16 bytes' worth, or 1 on the unaligned path */
  int32_t grid;         /* blocks of the first launch; each walks tokens grid apart */
  int32_t launches;     /* launches of the call (chunks above the workspace capacity) */
  int32_t pdl;          /* 1: launched with programmatic dependent launch */
  int32_t prefetch_rows; /* ABI 5. > 0: a block walking several rows asks L2 for the row this many
                          * grid strides beyond the one it loads; 0: no prefetch */
  int32_t early_weights; /* ABI 5. 1: with one row per block, weights are fetched with the row,
                          * before the exchange wait (else after it) */
  int32_t epoch_per_block; /* ABI 5. 1: one thread per block reads the workspace epoch (else one
                            * per warp) */
  int32_t prewait_prefetch_rows; /* ABI 6. rows of its own a block asks L2 for before the PDL wait:
                                  * 0 with ALLREDUCE_RMS_PREWAIT_PREFETCH=0, and by default when every
                                  * block has one row and there are more than 4 rows per SM */
} ArmsPlan;

/* Floor probes (floor_launch): what a launch costs with nothing in it, and with the smallest
 * Lamport exchange (one value+flag packet per peer). */
typedef enum ArmsFloorKind { ARMS_FLOOR_EMPTY = 0, ARMS_FLOOR_EXCHANGE = 1 } ArmsFloorKind;

#define ARMS_TRACE_POINTS 8 /* uint64 timestamps per traced launch */

typedef struct ArmsWorkspace ArmsWorkspace; /* opaque */

typedef struct ArmsBackendApi {
  uint32_t abi_version; /* ARMS_BACKEND_ABI_VERSION */
  uint32_t struct_size; /* sizeof(ArmsBackendApi) */
  const char* name;     /* "cuda" or "hip" */
  const char* (*last_error)(void);
  int (*device_count)(int* count);
  int (*warp_size)(void);
  /* Local launches (no workspace): LOCAL, STATS_OUT, STATS_IN. */
  int (*norm)(const ArmsNormArgs* args);
  /* Workspace lifecycle. capacity: tokens per slot; timeout_ns bounds every spin. */
  int (*workspace_create)(int device, int rank, int nranks, int capacity, int64_t timeout_ns,
                          ArmsWorkspace** out);
  int (*workspace_ipc_handle)(ArmsWorkspace* ws, uint8_t out[ARMS_IPC_HANDLE_BYTES]);
  /* handles: nranks * ARMS_IPC_HANDLE_BYTES bytes, in rank order (own entry ignored). */
  int (*workspace_open_peers)(ArmsWorkspace* ws, const uint8_t* handles);
  /* Functional P2P check: write a token into every peer, wait (bounded) for theirs. */
  int (*workspace_probe)(ArmsWorkspace* ws, uint32_t nonce, int64_t timeout_ns, int drop_peer_writes,
                         int* all_arrived);
  int (*workspace_fault)(ArmsWorkspace* ws, ArmsFault* out); /* host read, no device sync */
  int (*workspace_info)(ArmsWorkspace* ws, ArmsWorkspaceInfo* out); /* synchronizes the device */
  int (*workspace_destroy)(ArmsWorkspace* ws);
  /* Fused launch: LAMPORT mode (or LOCAL when nranks == 1); chunks T above capacity. */
  int (*fused_norm)(ArmsWorkspace* ws, const ArmsNormArgs* args);
  /* Process-wide counters (ABI 2); host only, no device sync, safe from any thread. */
  int (*resources)(ArmsBackendResources* out);
  /* ABI 3. The plan a call would use: capacity > 0 for a fused call on a workspace of that
   * capacity, 0 for a local one (args->mode). */
  int (*plan)(const ArmsNormArgs* args, int capacity, ArmsPlan* out);
  /* Tuning: force warps per token, vectors per thread and tokens per block (at least; the grid
   * is still clamped to co-resident blocks) for every later launch (0 = automatic), and (ABI 5)
   * the prefetch distance, early weights and epoch readers of ArmsPlan (-1 = automatic). */
  int (*set_plan_override)(int warps_per_token, int vectors_per_thread, int tokens_per_block, int prefetch_rows,
                           int early_weights, int epoch_per_block);
  /* Profiling: block 0 of every fused launch writes 6 globaltimer stamps (entry, after the PDL
   * wait, first row loaded and reduced, its partials sent, its peers' partials arrived, all stores
   * issued) to the first 6 of the ARMS_TRACE_POINTS words at trace[(call % depth) *
   * ARMS_TRACE_POINTS]. In a trace build (CMake ALLREDUCE_RMS_TRACE_ALL_BLOCKS=ON) every block of
   * the register-resident kernel also raises words 6 and 7 (atomicMax) to its own stamps of its
   * first row reduced and sent and of its last store, so they end as the latest of all blocks
   * (zero the trace first; a row reused by a later launch takes that launch's later stamps; the
   * wide-row kernel leaves them as they were). trace = NULL turns it off. trace is device memory
   * of depth * ARMS_TRACE_POINTS uint64. */
  int (*workspace_trace)(ArmsWorkspace* ws, uint64_t* trace, int depth);
  /* One floor-probe launch (ArmsFloorKind) on stream, on the workspace's device and peers. */
  int (*floor_launch)(ArmsWorkspace* ws, int kind, void* stream);
} ArmsBackendApi;

typedef const ArmsBackendApi* (*ArmsBackendEntry)(void);

#ifdef __cplusplus
}
#endif

#endif /* ARMS_BACKEND_API_H */

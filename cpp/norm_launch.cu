// Host launcher of the norm kernels: picks the plan (vector width, warps per token, vectors per
// thread) from the row width, its alignment and the token count, clamps the grid to co-resident
// blocks, splits token counts above the workspace capacity into chunks, and launches with PDL
// where supported. Rows the register-resident norm_kernel cannot hold go to wide_row_kernel.
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend_internal.h"
#include "norm_kernel.cuh"
#include "wide_row_kernel.cuh"

namespace arms {

using KernelFn = void (*)(const KernelParams);

namespace {

template <class D, int VEC, int VPT>
KernelFn kernel_for_mode(int mode) {
  switch (mode) {
    case ARMS_MODE_LOCAL: return norm_kernel<D, VEC, VPT, ARMS_MODE_LOCAL>;
    case ARMS_MODE_STATS_OUT: return norm_kernel<D, VEC, VPT, ARMS_MODE_STATS_OUT>;
    case ARMS_MODE_STATS_IN: return norm_kernel<D, VEC, VPT, ARMS_MODE_STATS_IN>;
    default: return norm_kernel<D, VEC, VPT, ARMS_MODE_LAMPORT>;
  }
}

// 16-byte vectors come with 1, 2, 4 or 8 of them per thread; the unaligned (scalar) path always
// uses 8 elements per thread.
constexpr int kScalarVpt = 8;
constexpr int kMaxVpt = 8;

template <class D>
KernelFn kernel_for(bool wide, int vpt, int mode) {
  constexpr int kVec = 16 / sizeof(typename D::storage);
  if (!wide) return kernel_for_mode<D, 1, kScalarVpt>(mode);
  switch (vpt) {
    case 1: return kernel_for_mode<D, kVec, 1>(mode);
    case 2: return kernel_for_mode<D, kVec, 2>(mode);
    case 4: return kernel_for_mode<D, kVec, 4>(mode);
    default: return kernel_for_mode<D, kVec, 8>(mode);
  }
}

// The wide-row kernel (wide_row_kernel.cuh): rows streamed in column chunks, for rows the
// register-resident kernel cannot take.
template <class D>
KernelFn wide_row_kernel_for(int mode) {
  switch (mode) {
    case ARMS_MODE_LOCAL: return wide_row_kernel<D, ARMS_MODE_LOCAL>;
    case ARMS_MODE_STATS_OUT: return wide_row_kernel<D, ARMS_MODE_STATS_OUT>;
    case ARMS_MODE_STATS_IN: return wide_row_kernel<D, ARMS_MODE_STATS_IN>;
    default: return wide_row_kernel<D, ARMS_MODE_LAMPORT>;
  }
}

// vectors_per_thread of a wide-row plan, in set_plan_override (forces that kernel) and in the
// plan a launcher reports: it has no fixed vectors per thread.
constexpr int kWideRowVpt = -1;
// Columns are indexed with 32-bit integers in the kernels, with room for a block's worth past
// the end of the row.
constexpr int64_t kMaxRowElems = int64_t{1} << 30;

int element_bytes(int dtype) { return dtype == ARMS_F32 ? 4 : 2; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
bool aligned_to(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0; }

struct DeviceLimits {
  int sms = 0;
  int l2_bytes = 0;
  bool pdl = false;
  // KernelParams::prewait_prefetch: 1 where it measured faster (prewait_prefetch_for), 0 never,
  // 2 on every 16-byte vector launch (ALLREDUCE_RMS_PREWAIT_PREFETCH=0/1/2, for side-by-side runs)
  int prewait_prefetch = 1;
};

DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceLimits limits;
  cudaDeviceGetAttribute(&limits.sms, cudaDevAttrMultiProcessorCount, device);
  if (cudaDeviceGetAttribute(&limits.l2_bytes, cudaDevAttrL2CacheSize, device) != platform::kSuccess) {
    (void)cudaGetLastError();  // clear it: no L2 size only means no L2 clamp of the wide-row grid
    limits.l2_bytes = 0;
  }
  limits.pdl = platform::device_supports_pdl(device);
  if (const char* env = getenv("ALLREDUCE_RMS_PDL")) limits.pdl = limits.pdl && env[0] != '0';
  if (const char* env = getenv("ALLREDUCE_RMS_PREWAIT_PREFETCH"))  // 0, 1 or 2; anything else: 1
    if (env[0] >= '0' && env[0] <= '2' && env[1] == '\0') limits.prewait_prefetch = env[0] - '0';
  cache[device] = limits;
  return limits;
}

// Blocks of `fn` at `block` threads that fit on one SM at once (cached: the query is slow, and
// this runs on every launch).
int blocks_per_sm(KernelFn fn, int block, int device) {
  struct Entry {
    KernelFn fn;
    int block;
    int device;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (e.fn == fn && e.block == block && e.device == device) return e.blocks;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, block, 0) != platform::kSuccess) {
    cudaGetLastError();
    n = 1;
  }
  if (n < 1) n = 1;
  cache.push_back({fn, block, device, n});
  return n;
}

// Process-wide plan override for tuning runs (set_plan_override); 0 (the last three: -1) = automatic.
int override_warps = 0;
int override_vpt = 0;
int override_tokens_per_block = 0;
int override_prefetch_rows = -1;
int override_early_weights = -1;
int override_epoch_per_block = -1;

// L2 prefetch distance, in grid strides, of a block that walks several rows (prefill); 0 when
// every block has one row. The row a block loads next is then already in L2 instead of DRAM.
constexpr int kPrefetchRows = 1;

int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// The plan by token count, measured on 2x H200 (TP2, MiniMax-M2 rows of 448 16-byte vectors,
// benchmarks/results/trace-*.json sweeps every plan at each T):
// - decode (under half a token per SM): as many warps per token as the row has 32-vector
//   columns for (up to 16), one vector per thread or two (weights then stay in registers,
//   loaded with the row);
// - up to 4 tokens per SM: 4 warps (more for rows over 512 vectors) and 4 vectors per thread,
//   the weights fetched with the row
//   (early_weights; history/trace-H200-tp2-early-weights-prefetch-sweep.json, T=256: 4.21 us
//   against 5.11 for the 8-warp plan and 5.25 for this one with the weights read after the exchange);
// - prefill: the fewest warps that cover the row with 8 vectors per thread; each block then walks
//   T / grid rows, the grid being clamped to the blocks that fit on the GPU at once, and asks L2
//   for the row one grid stride beyond the one it loads (same sweep: T=16384 73.8 us against
//   77.8 without the prefetch and 85.2 two strides ahead; T=4096 and 8192 within 4%).
// Never more warps than the row has 32-vector columns for.
// Tokens (rows) per SM, times two: the band choose_shape picks a plan by (<= 8: decode plans,
// > 8: the prefill plan), and prewait_prefetch_for's one-wave prefill test.
int64_t rows_per_sm_x2(int64_t rows, int sms) { return 2 * rows / std::max(1, sms); }
constexpr int64_t kDecodeBandX2 = 8;

struct Shape {
  int warps;
  int vpt;
  int tokens_per_block;
};

Shape choose_shape(int64_t row_vecs, int64_t tokens, bool wide, int sms) {
  const int warp = platform::kWarpSize;
  const int max_warps = kMaxBlockThreads / warp;
  const int useful = std::min(max_warps, pow2_ceil((row_vecs + warp - 1) / warp));
  const int64_t per_sm_x2 = rows_per_sm_x2(tokens, sms);
  if (wide && per_sm_x2 >= 1 && per_sm_x2 <= kDecodeBandX2) {
    // 4 vectors per thread with 4 warps (fewer if the row has fewer 32-vector columns): a row
    // wider than 512 vectors gets more warps, not 8 vectors per thread (only the MiniMax row was
    // measured in this band, where 8 warps x 4 had been the plan)
    int w = std::min(useful, 4);
    while (w < max_warps && static_cast<int64_t>(w) * warp * 4 < row_vecs) w *= 2;
    if (static_cast<int64_t>(w) * warp * 4 >= row_vecs) return {w, 4, 1};
  }
  int warps = per_sm_x2 == 0 ? useful : (per_sm_x2 <= kDecodeBandX2 ? std::min(useful, 4) : 1);
  const int min_vpt = per_sm_x2 >= 1 && per_sm_x2 <= kDecodeBandX2 ? 4 : (per_sm_x2 > kDecodeBandX2 ? kMaxVpt : 1);
  if (!wide) {
    while (warps < max_warps && static_cast<int64_t>(warps) * warp * kScalarVpt < row_vecs) warps *= 2;
    return {warps, kScalarVpt, 1};
  }
  for (;;) {
    for (int vpt : {1, 2, 4, 8})
      if (vpt >= std::min(min_vpt, kMaxVpt) && static_cast<int64_t>(warps) * warp * vpt >= row_vecs) return {warps, vpt, 1};
    if (warps >= max_warps) return {warps, kMaxVpt, 1};  // too wide: the caller reports it
    warps *= 2;
  }
}

struct Plan {
  KernelFn fn = nullptr;
  int vec = 1;
  int vpt = 1;
  int block = 0;
  int tokens_per_block = 1;
  int coresident = 1;
  bool pdl = false;
  bool wide_row = false;  // wide_row_kernel: vec is 1 (segment widths in elements), vpt kWideRowVpt
  int prefetch_rows = 0;  // KernelParams::prefetch_rows, for launches whose blocks walk several rows
  bool early_weights = true;  // KernelParams::early_weights
  bool epoch_per_block = true;  // KernelParams::epoch_per_block
  int prewait_prefetch = 0;  // DeviceLimits::prewait_prefetch where PDL is on, else 0
  int sms = 1;               // the device's SMs (prewait_prefetch_for's rows per SM)
};

}  // namespace

int fail(int status, const std::string& message);

int use_device(int device) {
  int current = -1;
  ARMS_RT(cudaGetDevice(&current), "querying the current device");
  if (current != device) ARMS_RT(cudaSetDevice(device), "selecting the device");
  return ARMS_OK;
}

int set_plan_override(int warps, int vpt, int tokens_per_block, int prefetch_rows, int early_weights,
                      int epoch_per_block) {
  const int max_warps = kMaxBlockThreads / platform::kWarpSize;
  if (warps < 0 || warps > max_warps || (warps & (warps - 1)) != 0)
    return fail(ARMS_INVALID_ARGUMENT,
                "warps_per_token must be 0 (automatic) or a power of two up to " + std::to_string(max_warps));
  if (vpt != 0 && vpt != 1 && vpt != 2 && vpt != 4 && vpt != 8 && vpt != kWideRowVpt)
    return fail(ARMS_INVALID_ARGUMENT,
                "vectors_per_thread must be 0 (automatic), 1, 2, 4, 8 or -1 (the wide-row kernel for every row)");
  if (tokens_per_block < 0) return fail(ARMS_INVALID_ARGUMENT, "tokens_per_block must be >= 0 (0: automatic)");
  if (prefetch_rows < -1 || prefetch_rows > 8)
    return fail(ARMS_INVALID_ARGUMENT, "prefetch_rows must be -1 (automatic) or 0..8 grid strides");
  if (early_weights < -1 || early_weights > 1)
    return fail(ARMS_INVALID_ARGUMENT, "early_weights must be -1 (automatic), 0 or 1");
  if (epoch_per_block < -1 || epoch_per_block > 1)
    return fail(ARMS_INVALID_ARGUMENT, "epoch_per_block must be -1 (automatic), 0 or 1");
  override_warps = warps;
  override_vpt = vpt;
  override_tokens_per_block = tokens_per_block;
  override_prefetch_rows = prefetch_rows;
  override_early_weights = early_weights;
  override_epoch_per_block = epoch_per_block;
  return ARMS_OK;
}

// The plan for rows the register-resident kernel cannot hold (wider than a block's registers,
// or unaligned beyond its scalar path's reach), or for every row when the plan override asks:
// wide_row_kernel, one block per token at a time (kWideRowThreads, or the override's warps),
// segment widths passed in elements. The kernel reads each row twice, the second time hoping to
// find it in L2, so the grid is also kept to about half the L2 cache's worth of rows in flight
// (at least one block per SM); co-residency is kept as for every spinning launch.
static int make_wide_row_plan(const ArmsNormArgs* a, int mode, int64_t row_elems, const DeviceLimits& limits,
                              Plan* plan) {
  const int warp = platform::kWarpSize;
  plan->wide_row = true;
  plan->vec = 1;
  plan->vpt = kWideRowVpt;
  plan->tokens_per_block = override_tokens_per_block > 0 ? override_tokens_per_block : 1;
  plan->block = override_warps > 0 ? override_warps * warp : kWideRowThreads;
  plan->fn = a->dtype == ARMS_F32 ? wide_row_kernel_for<F32>(mode)
           : a->dtype == ARMS_F16 ? wide_row_kernel_for<F16>(mode)
                                  : wide_row_kernel_for<BF16>(mode);
  const int sms = limits.sms > 0 ? limits.sms : 1;
  plan->coresident = blocks_per_sm(plan->fn, plan->block, a->device) * sms;
  const int64_t row_bytes = row_elems * element_bytes(a->dtype);
  if (limits.l2_bytes > 0) {
    const int64_t fit_l2 = std::max<int64_t>(sms, limits.l2_bytes / 2 / std::max<int64_t>(1, row_bytes));
    plan->coresident = static_cast<int>(std::min<int64_t>(plan->coresident, fit_l2));
  }
  plan->pdl = limits.pdl;
  return ARMS_OK;
}

// The variant fields of one segment (ABI 4): known flags, one gate position, a gate where a
// flag needs one, groups only where no exchange happens (a group inside one rank needs none).
static int check_variant(const ArmsSegment& g, int mode) {
  constexpr int kKnown = ARMS_GATE_BEFORE | ARMS_GATE_AFTER | ARMS_GATE_SIGMOID | ARMS_WEIGHT_IN_INPUT_DTYPE;
  if (g.flags & ~kKnown) return fail(ARMS_INVALID_ARGUMENT, "unknown variant flags");
  const int gated = g.flags & (ARMS_GATE_BEFORE | ARMS_GATE_AFTER);
  if (gated == (ARMS_GATE_BEFORE | ARMS_GATE_AFTER))
    return fail(ARMS_INVALID_ARGUMENT, "a gate goes either before or after the norm, not both");
  if (gated) {
    if (!g.gate) return fail(ARMS_INVALID_ARGUMENT, "a gate flag without a gate tensor");
    if (g.gate_dtype != ARMS_F32 && g.gate_dtype != ARMS_F16 && g.gate_dtype != ARMS_BF16)
      return fail(ARMS_INVALID_ARGUMENT, "unsupported gate dtype");
    if (!aligned_to(g.gate, element_bytes(g.gate_dtype)))
      return fail(ARMS_INVALID_ARGUMENT, "tensor pointer not aligned to its element size");
  }
  if (g.groups_in_row < 0) return fail(ARMS_INVALID_ARGUMENT, "groups_in_row must be >= 0");
  if (g.groups_in_row > 1 && mode == ARMS_MODE_LAMPORT)
    return fail(ARMS_INVALID_ARGUMENT, "groups inside one rank need no exchange: launch them locally");
  return ARMS_OK;
}

// Validate args and pick the launch plan for launches of at most `chunk` tokens.
static int make_plan(const ArmsNormArgs* a, int mode, int64_t chunk, Plan* plan) {
  if (a->num_segments < 1 || a->num_segments > ARMS_MAX_SEGMENTS)
    return fail(ARMS_INVALID_ARGUMENT, "num_segments must be 1 or 2");
  if (a->dtype != ARMS_F32 && a->dtype != ARMS_F16 && a->dtype != ARMS_BF16)
    return fail(ARMS_INVALID_ARGUMENT, "unsupported activation dtype");
  if (a->tokens < 0) return fail(ARMS_INVALID_ARGUMENT, "tokens must be >= 0");
  if ((mode == ARMS_MODE_STATS_OUT || mode == ARMS_MODE_STATS_IN) && !a->stats)
    return fail(ARMS_INVALID_ARGUMENT, "stats tensor required for this mode");
  const int esize = element_bytes(a->dtype);
  const int vec_wide = 16 / esize;
  bool wide = true;
  bool variant = a->rank_group > 0;  // any variant goes to the wide-row kernel, which has them all
  if (a->rank_group < 0) return fail(ARMS_INVALID_ARGUMENT, "rank_group must be >= 0");
  int64_t row_elems = 0;
  for (int s = 0; s < a->num_segments; ++s) {
    const ArmsSegment& g = a->segment[s];
    if (g.width <= 0 || g.full_width <= 0) return fail(ARMS_INVALID_ARGUMENT, "segment widths must be positive");
    if (int status = check_variant(g, mode)) return status;
    variant = variant || g.flags != 0 || g.weight_offset != 0.f || g.groups_in_row > 1;
    if (!g.in || (mode != ARMS_MODE_STATS_OUT && (!g.out || !g.weight)))
      return fail(ARMS_INVALID_ARGUMENT, "null tensor pointer");
    if (g.weight_dtype != ARMS_F32 && g.weight_dtype != ARMS_F16 && g.weight_dtype != ARMS_BF16)
      return fail(ARMS_INVALID_ARGUMENT, "unsupported weight dtype");
    // Every path reads whole elements (the wide-row kernel finds a row's 16-byte boundaries by
    // counting elements): a pointer between elements is a caller's bug, not a layout to serve.
    if (!aligned_to(g.in, esize) || (g.out && !aligned_to(g.out, esize)) ||
        (g.weight && !aligned_to(g.weight, element_bytes(g.weight_dtype))))
      return fail(ARMS_INVALID_ARGUMENT, "tensor pointer not aligned to its element size");
    wide = wide && g.width % vec_wide == 0 && aligned16(g.in) && (g.in_row_stride * esize) % 16 == 0;
    if (mode != ARMS_MODE_STATS_OUT)
      wide = wide && aligned16(g.out) && aligned16(g.weight) && (g.out_row_stride * esize) % 16 == 0;
    row_elems += g.width;
  }
  if (row_elems >= kMaxRowElems)
    return fail(ARMS_INVALID_ARGUMENT, "row too wide: " + std::to_string(row_elems) +
                                           " elements on this rank; the kernels take fewer than 2^30 per row");
  plan->vec = wide ? vec_wide : 1;
  const int64_t row_vecs = row_elems / plan->vec;
  const DeviceLimits limits = device_limits(a->device);
  Shape shape = choose_shape(row_vecs, std::min<int64_t>(a->tokens, chunk), wide, limits.sms);
  if (override_warps > 0) shape.warps = override_warps;
  if (override_vpt > 0 && wide) shape.vpt = override_vpt;
  if (override_tokens_per_block > 0) shape.tokens_per_block = override_tokens_per_block;
  plan->tokens_per_block = shape.tokens_per_block;
  const int warp = platform::kWarpSize;
  plan->block = shape.warps * warp;
  plan->vpt = shape.vpt;
  if (plan->block > kMaxBlockThreads || static_cast<int64_t>(plan->block) * shape.vpt < row_vecs ||
      override_vpt == kWideRowVpt || variant)
    return make_wide_row_plan(a, mode, row_elems, limits, plan);
  plan->fn = a->dtype == ARMS_F32 ? kernel_for<F32>(wide, shape.vpt, mode)
           : a->dtype == ARMS_F16 ? kernel_for<F16>(wide, shape.vpt, mode)
                                  : kernel_for<BF16>(wide, shape.vpt, mode);
  plan->coresident = blocks_per_sm(plan->fn, plan->block, a->device) * (limits.sms > 0 ? limits.sms : 1);
  plan->pdl = limits.pdl;
  plan->prewait_prefetch = limits.pdl ? limits.prewait_prefetch : 0;
  plan->sms = limits.sms > 0 ? limits.sms : 1;
  plan->prefetch_rows = override_prefetch_rows >= 0 ? override_prefetch_rows : kPrefetchRows;
  plan->early_weights = override_early_weights != 0;
  plan->epoch_per_block = override_epoch_per_block != 0;
  return ARMS_OK;
}

// Tokens of one launch: the Lamport slots hold `capacity` tokens, so larger fused calls run as
// consecutive launches, each a full exchange with its own epoch; local modes (capacity 0) need
// no chunking beyond int32 token counts.
static int64_t chunk_tokens(int capacity) { return capacity > 0 ? capacity : int64_t{1} << 30; }

// Blocks of one launch: one per tokens_per_block tokens, at most as many as are co-resident.
// Every block of a spinning launch must be resident at once, or a block waiting for a peer could
// keep the block the peer is waiting for from ever being scheduled.
// Also never more blocks than the workspace has epoch cells (lamport.cuh): block b reads cell b.
static int grid_for(int64_t tokens, const Plan& plan) {
  const int64_t wanted = (tokens + plan.tokens_per_block - 1) / plan.tokens_per_block;
  return static_cast<int>(std::min<int64_t>({wanted, plan.coresident, kEpochCells}));
}

// KernelParams::prewait_prefetch of a launch of `rows` rows on `grid` blocks. prefetch_row's bulk
// prefetch takes whole 16-byte words, so 16-byte vector plans only; and not when every block has
// one row and there are more than 4 rows per SM (the prefill plan in one wave): asking L2 while
// the previous launch's stores drain measured slower there (T = 1024 on 2x H200, TP2, 2-warp
// blocks: 6.48 against 6.31 us, history/trace-H200-tp2-epoch-cells-ab.json; 6.44 against 6.27
// with this rule, history/trace-H200-tp2-tail-claims-ab.json), while it gained 0.03-0.08 us at
// T = 1-256 and 3-5% with several rows per block. Those runs replay one input, whose rows are in
// L2 after the previous launch; the later chunks of a call above the workspace capacity, whose
// rows no launch has touched, follow the same rule unmeasured.
static bool prewait_prefetch_for(const Plan& plan, int dtype, int64_t rows, int grid) {
  if (plan.prewait_prefetch == 0 || plan.wide_row || plan.vec * element_bytes(dtype) != 16 || rows == 0) return false;
  const bool one_wave_prefill = grid >= rows && rows_per_sm_x2(rows, plan.sms) > kDecodeBandX2;
  return plan.prewait_prefetch == 2 || !one_wave_prefill;
}

int describe_plan(const ArmsNormArgs* a, int capacity, ArmsPlan* out) {
  if (!out) return fail(ARMS_INVALID_ARGUMENT, "plan: out is null");
  if (int status = use_device(a->device)) return status;
  const int64_t chunk = chunk_tokens(capacity);
  Plan plan;
  if (int status = make_plan(a, capacity > 0 ? ARMS_MODE_LAMPORT : a->mode, chunk, &plan)) return status;
  const int64_t first = std::min<int64_t>(a->tokens, chunk);
  out->warps_per_token = plan.block / platform::kWarpSize;
  out->vectors_per_thread = plan.vpt;  // kWideRowVpt (-1) for the wide-row kernel
  // the wide-row kernel moves the aligned middle of its rows in 16-byte vectors
  out->vector_elems = plan.wide_row ? 16 / element_bytes(a->dtype) : plan.vec;
  out->grid = static_cast<int32_t>(grid_for(first, plan));
  out->launches = static_cast<int32_t>((a->tokens + chunk - 1) / chunk);
  out->pdl = plan.pdl ? 1 : 0;
  // what the first launch's kernel does with them: prefetch when its blocks walk several rows,
  // early weights when each has one (and the kernel holds weights after the exchange at all)
  const bool one_row = out->grid >= first;
  // the first prefetch is of a block's third row (its first two are loaded directly)
  const bool third_row = static_cast<int64_t>(out->grid) * 2 < first;
  out->prefetch_rows = plan.wide_row || !third_row || plan.vec == 1 ? 0 : plan.prefetch_rows;
  out->early_weights = !plan.wide_row && one_row && plan.vec > 1 && plan.vpt > 2 && plan.early_weights &&
                       a->segment[0].weight_dtype == a->dtype &&
                       (a->num_segments == 1 || a->segment[1].weight_dtype == a->dtype) &&
                       (capacity > 0 || a->mode != ARMS_MODE_STATS_OUT);
  out->epoch_per_block = capacity > 0 && !plan.wide_row && plan.epoch_per_block && out->grid > 1 ? 1 : 0;
  out->prewait_prefetch_rows = prewait_prefetch_for(plan, a->dtype, first, out->grid) ? (out->grid < first ? 2 : 1) : 0;
  return ARMS_OK;
}

int launch_norm(const ArmsNormArgs* a, const LamportParams* lamport) {
  const int mode = lamport ? ARMS_MODE_LAMPORT : a->mode;
  if (mode < ARMS_MODE_LOCAL || mode > ARMS_MODE_LAMPORT || (mode == ARMS_MODE_LAMPORT && !lamport))
    return fail(ARMS_INVALID_ARGUMENT, "invalid mode for this entry point");
  const int64_t chunk_max = chunk_tokens(lamport ? lamport->capacity : 0);
  if (a->tokens == 0 && a->num_segments >= 1 && a->num_segments <= ARMS_MAX_SEGMENTS) return ARMS_OK;  // empty tensors may have null pointers
  Plan plan;
  if (int status = make_plan(a, mode, chunk_max, &plan)) return status;

  KernelParams p = {};
  p.num_segments = a->num_segments;
  p.eps = a->eps;
  int64_t row_vecs = 0;
  for (int s = 0; s < a->num_segments; ++s) {
    const ArmsSegment& g = a->segment[s];
    KernelSegment& k = p.seg[s];
    k.in = g.in;
    k.out = g.out;
    k.weight = g.weight;
    k.in_stride = g.in_row_stride;
    k.out_stride = g.out_row_stride;
    k.vecs = g.width / plan.vec;  // the wide-row kernel (vec 1): the width in elements
    k.weight_dtype = g.weight_dtype;
    k.inv_full_width = 1.0f / static_cast<float>(g.full_width);
    k.gate = g.gate;
    k.gate_stride = g.gate_row_stride;
    k.gate_dtype = g.gate_dtype;
    k.flags = g.flags;
    k.weight_offset = g.weight_offset;
    k.groups_in_row = g.groups_in_row > 1 ? g.groups_in_row : 1;
    row_vecs += k.vecs;
  }
  p.row_vecs = static_cast<int32_t>(row_vecs);
  // groups inside one rank: each row is `groups` kernel rows (check_variant allows them with one
  // segment's worth of groups only outside LAMPORT mode, so chunks stay whole rows)
  const int groups = a->num_segments == 1 ? p.seg[0].groups_in_row : 1;
  if (a->num_segments == 2 && (p.seg[0].groups_in_row > 1 || p.seg[1].groups_in_row > 1))
    return fail(ARMS_INVALID_ARGUMENT, "groups_in_row needs a single segment");
  if (a->tokens * groups >= (int64_t{1} << 31))
    return fail(ARMS_INVALID_ARGUMENT, "tokens * groups_in_row must stay below 2^31");
  p.rank_first = 0;
  p.rank_count = lamport ? lamport->nranks : 1;
  p.prefetch_rows = plan.prefetch_rows;
  p.early_weights = plan.early_weights ? 1 : 0;
  p.epoch_per_block = plan.epoch_per_block ? 1 : 0;
  if (lamport) {
    p.lamport = *lamport;
    if (a->rank_group > 0) {
      if (lamport->nranks % a->rank_group != 0)
        return fail(ARMS_INVALID_ARGUMENT, "rank_group must divide the number of ranks");
      p.rank_first = lamport->rank / a->rank_group * a->rank_group;
      p.rank_count = a->rank_group;
    }
  }

  const int esize = element_bytes(a->dtype);
  platform::Stream stream = static_cast<platform::Stream>(a->stream);
  for (int64_t start = 0; start < a->tokens; start += chunk_max) {
    const int64_t tokens = a->tokens - start < chunk_max ? a->tokens - start : chunk_max;
    KernelParams chunk = p;
    chunk.tokens = static_cast<int32_t>(tokens * groups);
    for (int s = 0; s < a->num_segments; ++s) {
      const ArmsSegment& g = a->segment[s];
      chunk.seg[s].in = static_cast<const char*>(g.in) + start * g.in_row_stride * esize;
      chunk.seg[s].out = g.out ? static_cast<char*>(g.out) + start * g.out_row_stride * esize : nullptr;
      if (g.gate)
        chunk.seg[s].gate = static_cast<const char*>(g.gate) + start * g.gate_row_stride * element_bytes(g.gate_dtype);
    }
    if (a->stats) chunk.stats = a->stats + start * groups * a->num_segments;
    const int grid = grid_for(tokens * groups, plan);  // kernel rows: every group of every token
    chunk.prewait_prefetch = prewait_prefetch_for(plan, a->dtype, tokens * groups, grid) ? 1 : 0;
    ARMS_RT(platform::launch(plan.fn, grid, plan.block, stream, plan.pdl, chunk), "launching the norm kernel");
  }
  return ARMS_OK;
}

int run_probe(const LamportParams& lp, uint32_t nonce, int drop_peer_writes, int* all_arrived) {
  int* flag = nullptr;
  ARMS_RT(cudaMalloc(reinterpret_cast<void**>(&flag), sizeof(int)), "allocating the probe flag");
  const int one = 1;
  int status = ARMS_OK;
  platform::Error e = cudaMemcpy(flag, &one, sizeof(int), cudaMemcpyHostToDevice);
  if (e == platform::kSuccess) e = platform::launch(probe_kernel, 1, ARMS_MAX_RANKS, nullptr, false, lp, nonce, drop_peer_writes, flag);
  if (e == platform::kSuccess) e = cudaMemcpy(all_arrived, flag, sizeof(int), cudaMemcpyDeviceToHost);
  if (e != platform::kSuccess) status = fail(ARMS_RUNTIME_ERROR, std::string("running the peer probe: ") + platform::error_string(e));
  cudaFree(flag);
  return status;
}

int launch_floor(const LamportParams& lp, int kind, int device, platform::Stream stream) {
  const bool pdl = device_limits(device).pdl;
  if (kind == ARMS_FLOOR_EMPTY) {
    ARMS_RT(platform::launch(floor_empty_kernel, 1, 1, stream, pdl), "launching the empty floor kernel");
  } else if (kind == ARMS_FLOOR_EXCHANGE) {
    ARMS_RT(platform::launch(floor_exchange_kernel, 1, platform::kWarpSize, stream, pdl, lp),
            "launching the exchange floor kernel");
  } else {
    return fail(ARMS_INVALID_ARGUMENT, "floor kind must be ARMS_FLOOR_EMPTY or ARMS_FLOOR_EXCHANGE");
  }
  return ARMS_OK;
}

}  // namespace arms

// Host launcher of the norm kernels: picks the vector width and the vectors per thread from the
// row width and alignment, picks norm_kernel (registers, few tokens per block) or stream_kernel
// (shared-memory ring, many tokens per block), sizes blocks, tiles and rings, clamps the grid to
// co-resident blocks, splits token counts above the workspace capacity into chunks, and launches
// with PDL where supported.
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend_internal.h"
#include "norm_kernel.cuh"
#include "stream_kernel.cuh"

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
template <class D>
KernelFn kernel_for(bool wide, int vpt, int mode) {
  constexpr int kVec = 16 / sizeof(typename D::storage);
  if (!wide) return kernel_for_mode<D, 1, 8>(mode);
  switch (vpt) {
    case 1: return kernel_for_mode<D, kVec, 1>(mode);
    case 2: return kernel_for_mode<D, kVec, 2>(mode);
    case 4: return kernel_for_mode<D, kVec, 4>(mode);
    default: return kernel_for_mode<D, kVec, 8>(mode);
  }
}

template <class D, int VPT>
KernelFn stream_kernel_for_mode(int mode) {
  constexpr int kVec = 16 / sizeof(typename D::storage);
  return mode == ARMS_MODE_LOCAL ? stream_kernel<D, kVec, VPT, ARMS_MODE_LOCAL> : stream_kernel<D, kVec, VPT, ARMS_MODE_LAMPORT>;
}

template <class D>
KernelFn stream_kernel_for(int vpt, int mode) {
  switch (vpt) {
    case 1: return stream_kernel_for_mode<D, 1>(mode);
    case 2: return stream_kernel_for_mode<D, 2>(mode);
    case 4: return stream_kernel_for_mode<D, 4>(mode);
    default: return stream_kernel_for_mode<D, 8>(mode);
  }
}

int element_bytes(int dtype) { return dtype == ARMS_F32 ? 4 : 2; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Which kernel serves a launch: ALLREDUCE_RMS_KERNEL=auto (default), register or stream.
enum class KernelChoice { kAuto, kRegister, kStream };

int env_int(const char* name, int fallback) {
  const char* v = getenv(name);
  return v && *v ? atoi(v) : fallback;
}

struct DeviceLimits {
  int sms = 0;
  bool pdl = false;
  int shared_per_block = 0;
  int shared_per_sm = 0;
  KernelChoice choice = KernelChoice::kAuto;
  int stream_min_tokens = 0;    // tokens per block from which auto picks stream_kernel
  int stream_max_lag = 0;       // cap on the lag (tuning knob)
  int stream_blocks_per_sm = 0; // 0: two where the ring fits, else one
  int vpt = 0;                  // 0: automatic; 1/2/4/8 forces vectors per thread where they fit
};

DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceLimits limits;
  cudaDeviceGetAttribute(&limits.sms, cudaDevAttrMultiProcessorCount, device);
  limits.pdl = platform::device_supports_pdl(device);
  if (const char* env = getenv("ALLREDUCE_RMS_PDL")) limits.pdl = limits.pdl && env[0] != '0';
  limits.shared_per_block = platform::max_shared_per_block(device);
  limits.shared_per_sm = platform::max_shared_per_sm(device);
  if (const char* env = getenv("ALLREDUCE_RMS_KERNEL")) {
    const std::string v = env;
    limits.choice = v == "register" ? KernelChoice::kRegister : v == "stream" ? KernelChoice::kStream : KernelChoice::kAuto;
  }
  limits.stream_min_tokens = env_int("ALLREDUCE_RMS_STREAM_MIN_TOKENS", kStreamMinTokensPerBlock);
  limits.stream_max_lag = env_int("ALLREDUCE_RMS_STREAM_MAX_LAG", kStreamMaxRing);
  limits.stream_blocks_per_sm = env_int("ALLREDUCE_RMS_STREAM_BLOCKS_PER_SM", 0);
  limits.vpt = env_int("ALLREDUCE_RMS_VPT", 0);
  cache[device] = limits;
  return limits;
}

// Blocks of `fn` at `block` threads that fit on one SM at once (cached: the query is slow, and
// this runs on every launch).
// Dynamic shared memory `fn` has been allowed on `device` so far (call with the cache lock held).
int& shared_allowed(KernelFn fn, int device) {
  static std::vector<std::pair<std::pair<KernelFn, int>, int>> allowed;
  for (auto& entry : allowed)
    if (entry.first.first == fn && entry.first.second == device) return entry.second;
  allowed.push_back({{fn, device}, 48 * 1024});  // the default every kernel gets without opting in
  return allowed.back().second;
}

// `shared` bytes of dynamic shared memory per block (opted in here, once per kernel and size).
int blocks_per_sm(KernelFn fn, int block, int device, int shared = 0) {
  struct Entry {
    KernelFn fn;
    int block;
    int device;
    int shared;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (e.fn == fn && e.block == block && e.device == device && e.shared == shared) return e.blocks;
  // The opt-in is an attribute of the kernel, not of the launch: only ever raise it, so a launch
  // planned earlier with a larger ring stays valid.
  int& allowed = shared_allowed(fn, device);
  if (shared > allowed && platform::allow_dynamic_shared(fn, shared) == platform::kSuccess) allowed = shared;
  int n = 0;
  if ((shared > 0 && shared > allowed) ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, block, shared) != platform::kSuccess) {
    cudaGetLastError();
    n = shared > 0 ? 0 : 1;  // a ring that cannot be opted in: no streaming
  }
  if (n < 0) n = 0;
  if (shared == 0 && n < 1) n = 1;
  cache.push_back({fn, block, device, shared, n});
  return n;
}

// stream_kernel's ring for one launch shape: slots and lag from the shared memory of the SM.
struct StreamPlan {
  KernelFn fn = nullptr;
  int slots = 0;
  int lag = 0;
  int shared = 0;      // dynamic bytes per block
  int coresident = 0;  // blocks of the grid that fit at once (0: no plan)
};

StreamPlan plan_stream(KernelFn fn, int block, int64_t row_vecs, int device, const DeviceLimits& limits) {
  StreamPlan plan;
  // static arrays of stream_kernel, plus what the runtime reserves per block (1 KiB on sm_80+)
  const int fixed = static_cast<int>(sizeof(float) * kStreamMaxRing * (kMaxBlockThreads / platform::kWarpSize + 1) *
                                     ARMS_MAX_SEGMENTS) + 1024;
  const int64_t row_bytes = row_vecs * 16;
  for (int per_sm : {2, 1}) {
    if (limits.stream_blocks_per_sm && per_sm != limits.stream_blocks_per_sm) continue;
    int64_t budget = limits.shared_per_sm / per_sm - fixed;
    if (budget > limits.shared_per_block - fixed + 1024) budget = limits.shared_per_block - fixed + 1024;
    int64_t slots = budget / row_bytes;
    if (slots > kStreamMaxRing) slots = kStreamMaxRing;
    int64_t lag = slots - kStreamPrefetch - 1;  // R >= P + L + 1 (stream_kernel.cuh)
    if (lag > limits.stream_max_lag) lag = limits.stream_max_lag;
    if (lag < 1) continue;
    slots = kStreamPrefetch + lag + 1;
    const int shared = static_cast<int>(slots * row_bytes);
    const int blocks = blocks_per_sm(fn, block, device, shared);
    if (blocks < 1) continue;
    plan.fn = fn;
    plan.slots = static_cast<int>(slots);
    plan.lag = static_cast<int>(lag);
    plan.shared = shared;
    plan.coresident = blocks * (limits.sms > 0 ? limits.sms : 1);
    return plan;
  }
  return plan;
}

}  // namespace

int fail(int status, const std::string& message);

int use_device(int device) {
  int current = -1;
  ARMS_RT(cudaGetDevice(&current), "querying the current device");
  if (current != device) ARMS_RT(cudaSetDevice(device), "selecting the device");
  return ARMS_OK;
}

int launch_norm(const ArmsNormArgs* a, const LamportParams* lamport) {
  const int mode = lamport ? ARMS_MODE_LAMPORT : a->mode;
  if (a->num_segments < 1 || a->num_segments > ARMS_MAX_SEGMENTS)
    return fail(ARMS_INVALID_ARGUMENT, "num_segments must be 1 or 2");
  if (a->dtype != ARMS_F32 && a->dtype != ARMS_F16 && a->dtype != ARMS_BF16)
    return fail(ARMS_INVALID_ARGUMENT, "unsupported activation dtype");
  if (mode < ARMS_MODE_LOCAL || mode > ARMS_MODE_LAMPORT || (mode == ARMS_MODE_LAMPORT && !lamport))
    return fail(ARMS_INVALID_ARGUMENT, "invalid mode for this entry point");
  if (a->tokens < 0) return fail(ARMS_INVALID_ARGUMENT, "tokens must be >= 0");
  if (a->tokens == 0) return ARMS_OK;
  if ((mode == ARMS_MODE_STATS_OUT || mode == ARMS_MODE_STATS_IN) && !a->stats)
    return fail(ARMS_INVALID_ARGUMENT, "stats tensor required for this mode");

  const int esize = element_bytes(a->dtype);
  const int vec_wide = 16 / esize;
  bool wide = true;
  int64_t row_elems = 0;
  for (int s = 0; s < a->num_segments; ++s) {
    const ArmsSegment& g = a->segment[s];
    if (g.width <= 0 || g.full_width < g.width) return fail(ARMS_INVALID_ARGUMENT, "segment widths must be positive");
    if (!g.in || (mode != ARMS_MODE_STATS_OUT && (!g.out || !g.weight)))
      return fail(ARMS_INVALID_ARGUMENT, "null tensor pointer");
    if (g.weight_dtype != ARMS_F32 && g.weight_dtype != ARMS_F16 && g.weight_dtype != ARMS_BF16)
      return fail(ARMS_INVALID_ARGUMENT, "unsupported weight dtype");
    wide = wide && g.width % vec_wide == 0 && aligned16(g.in) && (g.in_row_stride * esize) % 16 == 0;
    if (mode != ARMS_MODE_STATS_OUT)
      wide = wide && aligned16(g.out) && aligned16(g.weight) && (g.out_row_stride * esize) % 16 == 0;
    row_elems += g.width;
  }
  const int vec = wide ? vec_wide : 1;
  int64_t row_vecs = row_elems / vec;
  const DeviceLimits limits = device_limits(a->device);
  int vpt = 8;
  if (wide)
    for (int candidate : {1, 2, 4, 8})
      if ((row_vecs + candidate - 1) / candidate <= kMaxBlockThreads && candidate >= limits.vpt) {
        vpt = candidate;
        break;
      }
  const int64_t threads_needed = (row_vecs + vpt - 1) / vpt;
  if (threads_needed > kMaxBlockThreads)
    return fail(ARMS_INVALID_ARGUMENT,
                "row too wide: " + std::to_string(row_elems) + " elements on this rank; at most " +
                    std::to_string(kMaxBlockThreads * 8 * vec) + " fit one block" +
                    (wide ? "" : " on the unaligned path (make pointers and row strides 16-byte aligned)"));
  const int warp = platform::kWarpSize;
  const int block = static_cast<int>((threads_needed + warp - 1) / warp * warp);

  KernelFn fn = a->dtype == ARMS_F32 ? kernel_for<F32>(wide, vpt, mode)
              : a->dtype == ARMS_F16 ? kernel_for<F16>(wide, vpt, mode)
                                     : kernel_for<BF16>(wide, vpt, mode);
  const int coresident = blocks_per_sm(fn, block, a->device) * (limits.sms > 0 ? limits.sms : 1);
  StreamPlan stream_plan;
  const bool stream_candidate = limits.choice == KernelChoice::kStream ||
                                (limits.choice == KernelChoice::kAuto &&
                                 a->tokens >= static_cast<int64_t>(limits.stream_min_tokens) * limits.sms);
  if (wide && (mode == ARMS_MODE_LOCAL || mode == ARMS_MODE_LAMPORT) && stream_candidate) {
    KernelFn sfn = a->dtype == ARMS_F32 ? stream_kernel_for<F32>(vpt, mode)
                 : a->dtype == ARMS_F16 ? stream_kernel_for<F16>(vpt, mode)
                                        : stream_kernel_for<BF16>(vpt, mode);
    stream_plan = plan_stream(sfn, block, row_vecs, a->device, limits);
  }
  const int tpb_max = tile_tokens_max(vpt);

  KernelParams p = {};
  p.num_segments = a->num_segments;
  p.row_vecs = static_cast<int32_t>(row_vecs);
  p.eps = a->eps;
  for (int s = 0; s < a->num_segments; ++s) {
    const ArmsSegment& g = a->segment[s];
    KernelSegment& k = p.seg[s];
    k.in = g.in;
    k.out = g.out;
    k.weight = g.weight;
    k.in_stride = g.in_row_stride;
    k.out_stride = g.out_row_stride;
    k.vecs = g.width / vec;
    k.weight_dtype = g.weight_dtype;
    k.inv_full_width = 1.0f / static_cast<float>(g.full_width);
  }
  if (lamport) p.lamport = *lamport;

  // The Lamport slots hold `capacity` tokens: larger calls run as consecutive launches, each one
  // a full exchange with its own epoch. Local modes need no chunking beyond int32 token counts.
  const int64_t chunk_max = lamport ? lamport->capacity : (int64_t{1} << 30);
  platform::Stream stream = static_cast<platform::Stream>(a->stream);
  for (int64_t start = 0; start < a->tokens; start += chunk_max) {
    const int64_t tokens = a->tokens - start < chunk_max ? a->tokens - start : chunk_max;
    KernelParams chunk = p;
    chunk.tokens = static_cast<int32_t>(tokens);
    for (int s = 0; s < a->num_segments; ++s) {
      const ArmsSegment& g = a->segment[s];
      const int64_t e = esize;
      chunk.seg[s].in = static_cast<const char*>(g.in) + start * g.in_row_stride * e;
      chunk.seg[s].out = g.out ? static_cast<char*>(g.out) + start * g.out_row_stride * e : nullptr;
    }
    if (a->stats) chunk.stats = a->stats + start * a->num_segments;
    const StreamPlan& sp = stream_plan;
    if (sp.coresident > 0 && (limits.choice == KernelChoice::kStream ||
                              tokens >= static_cast<int64_t>(limits.stream_min_tokens) * sp.coresident)) {
      chunk.ring_slots = sp.slots;
      chunk.lag = sp.lag;
      // As below, every block must be resident: a block spins for statistics of tokens its
      // peer-rank counterpart (same block index) sends.
      const int grid = static_cast<int>(tokens < sp.coresident ? tokens : sp.coresident);
      ARMS_RT(platform::launch_shared(sp.fn, grid, block, sp.shared, stream, limits.pdl, chunk),
              "launching the streaming norm kernel");
      continue;
    }
    int tpb = static_cast<int>((tokens + coresident - 1) / coresident);
    tpb = tpb < 1 ? 1 : (tpb > tpb_max ? tpb_max : tpb);
    chunk.tokens_per_tile = tpb;
    const int64_t tiles = (tokens + tpb - 1) / tpb;
    // Every block of a spinning launch must be resident at once, or a block waiting for a peer
    // could keep the block the peer is waiting for from ever being scheduled.
    const int grid = static_cast<int>(tiles < coresident ? tiles : coresident);
    ARMS_RT(platform::launch(fn, grid, block, stream, limits.pdl, chunk), "launching the norm kernel");
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

int fill_empty(uint32_t* cells, int64_t count, platform::Stream stream) {
  ARMS_RT(platform::launch(fill_cells_kernel, 256, 256, stream, false, cells, count, kEmptyCell), "clearing the workspace");
  return ARMS_OK;
}

}  // namespace arms

// Host launcher of the norm kernel: picks the vector width and the vectors per thread from the
// row width and alignment, sizes blocks and tiles, clamps the grid to co-resident blocks, splits
// token counts above the workspace capacity into chunks, and launches with PDL where supported.
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend_internal.h"
#include "norm_kernel.cuh"

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

int element_bytes(int dtype) { return dtype == ARMS_F32 ? 4 : 2; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

struct DeviceLimits {
  int sms = 0;
  bool pdl = false;
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
  // The fewest vectors per thread that fit one block, except from 24 tokens per SM on: there
  // four per thread where that still leaves 64+ threads (smaller blocks, more of them resident).
  // Measured on 2x H200, TP2 MiniMax bf16: 52.7 vs 56.0 us at T=8192, 98.1 vs 104.4 at 16384,
  // but slower below a few thousand tokens.
  const int min_vpt = a->tokens >= 24LL * limits.sms && row_vecs >= 4 * 64 ? 4 : 1;
  int vpt = 8;
  if (wide)
    for (int candidate : {1, 2, 4, 8})
      if ((row_vecs + candidate - 1) / candidate <= kMaxBlockThreads && candidate >= min_vpt) {
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

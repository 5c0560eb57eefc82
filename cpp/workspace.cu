// Lamport workspace lifecycle: allocate and clear the cells, export and import IPC handles,
// probe the peers, report faults, free everything.
#include <atomic>
#include <cstring>

#include "backend_internal.h"

using arms::fail;

arms::LamportParams ArmsWorkspace::params(int op) const {
  arms::LamportParams lp = {};
  for (int r = 0; r < nranks; ++r) lp.buffers[r] = mapped[r];
  lp.ctrl = ctrl;
  lp.fault = fault_device;
  lp.trace = trace;
  lp.trace_depth = trace_depth;
  lp.rank = rank;
  lp.nranks = nranks;
  lp.capacity = capacity;
  lp.op = op;
  lp.timeout_ns = timeout_ns;
  return lp;
}

namespace arms {

// Process-wide counters for resources(): a leak shows up as a count that does not return to
// its earlier value, without the caller having to keep any workspace around to ask it.
static std::atomic<int64_t> workspaces_live{0};
static std::atomic<int64_t> ipc_mappings_open{0};
static std::atomic<int64_t> device_bytes{0};

// Counted per workspace only after an allocation succeeded, so release() of a half-built
// workspace subtracts exactly what was added, whatever a failed allocation left in its pointer.
static void count_device_bytes(ArmsWorkspace* ws, int64_t bytes) {
  ws->counted_bytes += bytes;
  device_bytes += bytes;
}

// Frees whatever `ws` holds, also a half-built one: every counter goes back down here only.
static void release(ArmsWorkspace* ws) {
  for (int r = 0; r < ARMS_MAX_RANKS; ++r) {
    // A mapping whose close fails stays counted: it is exactly the leak the counter exists for.
    if (ws->opened[r] && cudaIpcCloseMemHandle(ws->mapped[r]) == platform::kSuccess) ipc_mappings_open--;
    ws->opened[r] = false;
    ws->mapped[r] = nullptr;
  }
  if (ws->own) platform::free_polled(ws->own);
  if (ws->ctrl) cudaFree(ws->ctrl);
  if (ws->fault_host) cudaFreeHost(ws->fault_host);
  device_bytes -= ws->counted_bytes;
  delete ws;
  workspaces_live--;
}

int workspace_create(int device, int rank, int nranks, int capacity, int64_t timeout_ns, ArmsWorkspace** out) {
  if (nranks < 1 || nranks > ARMS_MAX_RANKS) return fail(ARMS_INVALID_ARGUMENT, "nranks must be in [1, 8]");
  if (rank < 0 || rank >= nranks) return fail(ARMS_INVALID_ARGUMENT, "rank must be in [0, nranks)");
  if (capacity < 2 || capacity % 2 != 0) return fail(ARMS_INVALID_ARGUMENT, "capacity must be an even number >= 2");
  if (timeout_ns <= 0) return fail(ARMS_INVALID_ARGUMENT, "timeout must be positive");
  if (int status = use_device(device)) return status;

  ArmsWorkspace* ws = new ArmsWorkspace();
  workspaces_live++;
  ws->device = device;
  ws->rank = rank;
  ws->nranks = nranks;
  ws->capacity = capacity;
  ws->timeout_ns = timeout_ns;
  ws->buffer_bytes = buffer_packets(nranks, capacity) * static_cast<int64_t>(sizeof(uint64_t));

  auto check = [&](platform::Error e, const char* what) {
    if (e == platform::kSuccess) return 0;
    release(ws);
    return fail(ARMS_RUNTIME_ERROR, std::string(what) + ": " + platform::error_string(e));
  };
  if (int s = check(platform::alloc_polled(reinterpret_cast<void**>(&ws->own), ws->buffer_bytes), "allocating the Lamport buffer")) return s;
  count_device_bytes(ws, ws->buffer_bytes);
  ws->mapped[rank] = ws->own;
  if (int s = check(cudaMalloc(reinterpret_cast<void**>(&ws->ctrl), sizeof(ControlBlock)), "allocating the control block")) return s;
  count_device_bytes(ws, sizeof(ControlBlock));
  if (int s = check(cudaMemset(ws->ctrl, 0, sizeof(ControlBlock)), "clearing the control block")) return s;
  if (int s = check(cudaHostAlloc(reinterpret_cast<void**>(&ws->fault_host), sizeof(ArmsFault), cudaHostAllocMapped),
                    "allocating the host-mapped fault record"))
    return s;
  memset(ws->fault_host, 0, sizeof(ArmsFault));
  if (int s = check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ws->fault_device), ws->fault_host, 0),
                    "mapping the fault record"))
    return s;
  // Zero is never a flag: a zeroed buffer holds no packet of any launch (lamport.cuh).
  if (int s = check(cudaMemset(ws->own, 0, ws->buffer_bytes), "clearing the Lamport buffer")) return s;
  // Every packet must be zero (no flag) before any peer can be told our handle.
  if (int s = check(cudaDeviceSynchronize(), "initializing the workspace")) return s;
  *out = ws;
  return ARMS_OK;
}

int workspace_ipc_handle(ArmsWorkspace* ws, uint8_t out[ARMS_IPC_HANDLE_BYTES]) {
  if (int status = use_device(ws->device)) return status;
  cudaIpcMemHandle_t handle;
  static_assert(sizeof(handle) == ARMS_IPC_HANDLE_BYTES, "IPC handle size");
  ARMS_RT(cudaIpcGetMemHandle(&handle, ws->own), "exporting the workspace IPC handle");
  memcpy(out, &handle, sizeof(handle));
  return ARMS_OK;
}

int workspace_open_peers(ArmsWorkspace* ws, const uint8_t* handles) {
  if (int status = use_device(ws->device)) return status;
  for (int r = 0; r < ws->nranks; ++r) {
    if (r == ws->rank || ws->opened[r]) continue;
    cudaIpcMemHandle_t handle;
    memcpy(&handle, handles + static_cast<size_t>(r) * ARMS_IPC_HANDLE_BYTES, sizeof(handle));
    void* peer = nullptr;
    platform::Error e = cudaIpcOpenMemHandle(&peer, handle, cudaIpcMemLazyEnablePeerAccess);
    if (e != platform::kSuccess) {
      cudaGetLastError();  // IPC failures are not sticky; leave no error behind for the next call
      return fail(ARMS_RUNTIME_ERROR, "opening the IPC handle of rank " + std::to_string(r) + ": " + platform::error_string(e));
    }
    ws->mapped[r] = static_cast<uint64_t*>(peer);
    ws->opened[r] = true;
    ipc_mappings_open++;
  }
  return ARMS_OK;
}

int workspace_probe(ArmsWorkspace* ws, uint32_t nonce, int64_t timeout_ns, int drop_peer_writes, int* all_arrived) {
  for (int r = 0; r < ws->nranks; ++r)
    if (!ws->mapped[r]) return fail(ARMS_INVALID_ARGUMENT, "probe before every peer is open");
  if (int status = use_device(ws->device)) return status;
  LamportParams lp = ws->params(0);
  lp.timeout_ns = timeout_ns;
  return run_probe(lp, nonce, drop_peer_writes, all_arrived);
}

int workspace_fault(ArmsWorkspace* ws, ArmsFault* out) {
  const volatile ArmsFault* f = ws->fault_host;
  out->failed = f->failed;
  out->op = f->op;
  out->rank = f->rank;
  out->peer = f->peer;
  out->epoch = f->epoch;
  out->tokens = f->tokens;
  return ARMS_OK;
}

int workspace_info(ArmsWorkspace* ws, ArmsWorkspaceInfo* out) {
  if (int status = use_device(ws->device)) return status;
  ControlBlock ctrl;
  ARMS_RT(cudaDeviceSynchronize(), "synchronizing the workspace device");
  ARMS_RT(cudaMemcpy(&ctrl, ws->ctrl, sizeof(ctrl), cudaMemcpyDeviceToHost), "reading the control block");
  out->epoch = ctrl.epoch_cells[0] & kEpochMask;  // every cell holds the same epoch between launches
  out->capacity = ws->capacity;
  out->buffer_bytes = ws->buffer_bytes;
  int open = 0;
  for (int r = 0; r < ARMS_MAX_RANKS; ++r) open += ws->opened[r] ? 1 : 0;
  out->peers_open = open;
  out->reserved = 0;
  return ARMS_OK;
}

int workspace_resources(ArmsBackendResources* out) {
  if (!out) return fail(ARMS_INVALID_ARGUMENT, "resources: out is null");
  out->workspaces_live = workspaces_live.load();
  out->ipc_mappings_open = ipc_mappings_open.load();
  out->device_bytes = device_bytes.load();
  out->reserved = 0;
  return ARMS_OK;
}

int workspace_destroy(ArmsWorkspace* ws) {
  if (!ws) return ARMS_OK;
  use_device(ws->device);
  // Kernels still in flight may read the buffers: wait for them (a timed-out kernel has exited).
  cudaDeviceSynchronize();
  release(ws);
  return ARMS_OK;
}

int workspace_trace(ArmsWorkspace* ws, uint64_t* trace, int depth) {
  if (trace && depth < 1) return fail(ARMS_INVALID_ARGUMENT, "trace depth must be >= 1");
  ws->trace = trace;
  ws->trace_depth = trace ? depth : 0;
  return ARMS_OK;
}

int floor_launch(ArmsWorkspace* ws, int kind, void* stream) {
  if (int status = use_device(ws->device)) return status;
  if (kind == ARMS_FLOOR_EXCHANGE)
    for (int r = 0; r < ws->nranks; ++r)
      if (!ws->mapped[r]) return fail(ARMS_INVALID_ARGUMENT, "workspace peers are not open");
  return launch_floor(ws->params(0), kind, ws->device, static_cast<platform::Stream>(stream));
}

int fused_norm(ArmsWorkspace* ws, const ArmsNormArgs* args) {
  if (ws->fault_host->failed) {
    const volatile ArmsFault* f = ws->fault_host;
    const char* op = f->op == ARMS_OP_QK_NORM ? "qk_norm" : "rms_norm";
    return fail(ARMS_PEER_TIMEOUT, std::string(op) + " on rank " + std::to_string(f->rank) + " timed out after " +
                                       std::to_string(ws->timeout_ns / 1000000) + " ms waiting for rank " + std::to_string(f->peer) +
                                       " in call #" + std::to_string(f->epoch) +
                                       " on this workspace (" + std::to_string(f->tokens) +
                                       " tokens); the workspace is unusable, create a new one");
  }
  if (int status = use_device(ws->device)) return status;
  if (ws->nranks == 1) {
    ArmsNormArgs local = *args;
    local.mode = ARMS_MODE_LOCAL;
    return launch_norm(&local, nullptr);
  }
  for (int r = 0; r < ws->nranks; ++r)
    if (!ws->mapped[r]) return fail(ARMS_INVALID_ARGUMENT, "workspace peers are not open");
  const LamportParams lp = ws->params(args->op);
  return launch_norm(args, &lp);
}

}  // namespace arms

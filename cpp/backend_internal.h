// Shared by the backend's translation units: error plumbing and the workspace definition.
#pragma once

#include <string>

#include "backend_api.h"
#include "lamport.cuh"
#include "platform.h"

namespace arms {

// Remember why the last call on this thread failed; returns status for `return fail(...)`.
int fail(int status, const std::string& message);

#define ARMS_RT(expr, what)                                                                         \
  do {                                                                                              \
    ::arms::platform::Error arms_rt_error_ = (expr);                                                \
    if (arms_rt_error_ != ::arms::platform::kSuccess)                                               \
      return ::arms::fail(ARMS_RUNTIME_ERROR, std::string(what) + ": " +                            \
                                                  ::arms::platform::error_string(arms_rt_error_)); \
  } while (0)

// Make `device` current for the calling thread (cheap when it already is).
int use_device(int device);

// Launch the norm kernel for args on one device. With lamport == nullptr, args->mode must be a
// local mode; otherwise the mode is LAMPORT and lamport describes the exchange.
int launch_norm(const ArmsNormArgs* args, const LamportParams* lamport);

// Launch the functional peer probe and wait for it (bounded by timeout_ns).
int run_probe(const LamportParams& lp, uint32_t nonce, int drop_peer_writes, int* all_arrived);

// Choose the plan a call would use (see ArmsBackendApi::plan) and the tuning override.
int describe_plan(const ArmsNormArgs* args, int capacity, ArmsPlan* out);
int set_plan_override(int warps_per_token, int vectors_per_thread, int tokens_per_block, int prefetch_rows,
                      int early_weights, int epoch_per_block);

// One floor-probe launch (ArmsFloorKind) with the exchange of lp.
int launch_floor(const LamportParams& lp, int kind, int device, platform::Stream stream);

}  // namespace arms

struct ArmsWorkspace {
  int device = 0;
  int rank = 0;
  int nranks = 1;
  int capacity = 0;
  int64_t timeout_ns = 0;
  uint64_t* own = nullptr;  // this rank's packets
  int64_t buffer_bytes = 0;
  int64_t counted_bytes = 0;  // device bytes this workspace added to the process-wide count
  uint64_t* mapped[ARMS_MAX_RANKS] = {};  // peer buffers as opened here; mapped[rank] == own
  bool opened[ARMS_MAX_RANKS] = {};       // which of mapped[] are IPC mappings to close
  arms::ControlBlock* ctrl = nullptr;
  ArmsFault* fault_host = nullptr;  // pinned, mapped: the kernel writes, the host reads
  ArmsFault* fault_device = nullptr;
  uint64_t* trace = nullptr;  // optional per-launch timestamps (workspace_trace)
  int trace_depth = 0;

  arms::LamportParams params(int op) const;
};

// The one exported symbol of a backend library: a versioned table of the functions the front
// module may call (see backend_api.h).
#include <string>

#include "backend_internal.h"

namespace arms {

int workspace_create(int, int, int, int, int64_t, ArmsWorkspace**);
int workspace_ipc_handle(ArmsWorkspace*, uint8_t*);
int workspace_open_peers(ArmsWorkspace*, const uint8_t*);
int workspace_probe(ArmsWorkspace*, uint32_t, int64_t, int, int*);
int workspace_fault(ArmsWorkspace*, ArmsFault*);
int workspace_info(ArmsWorkspace*, ArmsWorkspaceInfo*);
int workspace_destroy(ArmsWorkspace*);
int workspace_resources(ArmsBackendResources*);
int fused_norm(ArmsWorkspace*, const ArmsNormArgs*);
int workspace_trace(ArmsWorkspace*, uint64_t*, int);
int floor_launch(ArmsWorkspace*, int, void*);

namespace {
thread_local std::string last_error_message;

const char* last_error() { return last_error_message.c_str(); }

int device_count(int* count) {
  ARMS_RT(cudaGetDeviceCount(count), "counting devices");
  return ARMS_OK;
}

int warp_size() { return platform::kWarpSize; }

int norm(const ArmsNormArgs* args) {
  if (args->mode == ARMS_MODE_LAMPORT) return fail(ARMS_INVALID_ARGUMENT, "LAMPORT mode needs a workspace");
  if (int status = use_device(args->device)) return status;
  return launch_norm(args, nullptr);
}

const ArmsBackendApi table = {
    ARMS_BACKEND_ABI_VERSION,
    sizeof(ArmsBackendApi),
    ARMS_BACKEND_NAME,
    last_error,
    device_count,
    warp_size,
    norm,
    workspace_create,
    workspace_ipc_handle,
    workspace_open_peers,
    workspace_probe,
    workspace_fault,
    workspace_info,
    workspace_destroy,
    fused_norm,
    workspace_resources,
    describe_plan,
    set_plan_override,
    workspace_trace,
    floor_launch,
};
}  // namespace

int fail(int status, const std::string& message) {
  last_error_message = message;
  return status;
}

}  // namespace arms

extern "C" __attribute__((visibility("default"))) const ArmsBackendApi* arms_backend_api(void) { return &arms::table; }

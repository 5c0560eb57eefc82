// The nanobind front module: host C++ only, no libtorch and no GPU runtime linked.
//
// It loads backend libraries (libarms_cuda.so, libarms_hip.so) with dlopen on first use and
// dispatches by DLPack device type (kDLCUDA -> CUDA backend, kDLROCM -> HIP backend). Two kinds
// of entry points:
//   * rms_norm(x, weight, out, eps, stream): takes any DLPack tensors (torch, CuPy, JAX, ...)
//     as nb::ndarray and validates them here;
//   * launch_local / Workspace.launch: the torch hot path. torch's __dlpack__ costs several
//     microseconds per tensor, more than this whole op's eager budget, so the Python layer
//     validates torch tensors itself and passes raw pointers, strides and dtype codes.
#include <dlfcn.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "backend_api.h"
#include "hot_ops.h"

namespace nb = nanobind;

// What the build did with each backend, in words (set by cmake/Backends.cmake): reported by
// allreduce_rms.backends() so that "not built" names its cause (a build option or no toolchain).
#ifndef ARMS_CUDA_BUILD_NOTE
#define ARMS_CUDA_BUILD_NOTE "unknown: the front module was built outside the package's CMake"
#endif
#ifndef ARMS_HIP_BUILD_NOTE
#define ARMS_HIP_BUILD_NOTE "unknown: the front module was built outside the package's CMake"
#endif

namespace {

constexpr int kDLCPU = 1;
constexpr int kDLCUDA = 2;
constexpr int kDLROCM = 10;

struct BackendSlot {
  const ArmsBackendApi* api = nullptr;
  std::string error = "not loaded";
  bool tried = false;
};

std::array<BackendSlot, 2> backends;  // [0]: CUDA, [1]: HIP

int slot_for_device_type(int device_type) {
  if (device_type == kDLCUDA) return 0;
  if (device_type == kDLROCM) return 1;
  if (device_type == kDLCPU) throw nb::value_error("CPU tensors have no GPU backend: use the torch fallback");
  throw nb::value_error(("unsupported DLPack device type " + std::to_string(device_type)).c_str());
}

// Load the backend library at `path` into the slot for `device_type`; returns "" or the reason.
std::string load_backend(int device_type, const std::string& path) {
  BackendSlot& slot = backends[slot_for_device_type(device_type)];
  if (slot.api) return "";
  slot.tried = true;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = dlerror();
    slot.error = why ? why : "dlopen failed";
    return slot.error;
  }
  auto entry = reinterpret_cast<ArmsBackendEntry>(dlsym(lib, ARMS_BACKEND_SYMBOL));
  if (!entry) {
    slot.error = std::string(path) + " does not export " + ARMS_BACKEND_SYMBOL;
    return slot.error;
  }
  const ArmsBackendApi* api = entry();
  if (!api || api->abi_version != ARMS_BACKEND_ABI_VERSION || api->struct_size < sizeof(ArmsBackendApi)) {
    slot.error = std::string(path) + " has backend ABI version " + (api ? std::to_string(api->abi_version) : "?") +
                 ", this front module needs " + std::to_string(ARMS_BACKEND_ABI_VERSION);
    return slot.error;
  }
  slot.api = api;
  slot.error.clear();
  return "";
}

const ArmsBackendApi& backend(int device_type) {
  BackendSlot& slot = backends[slot_for_device_type(device_type)];
  if (!slot.api)
    throw std::runtime_error("allreduce_rms: no " + std::string(device_type == kDLCUDA ? "CUDA" : "HIP") +
                             " backend loaded (" + slot.error + ")");
  return *slot.api;
}

// Turn a backend status into the matching Python exception.
void check(const ArmsBackendApi& api, int status) {
  if (status == ARMS_OK) return;
  const std::string message = std::string("allreduce_rms: ") + api.last_error();
  if (status == ARMS_INVALID_ARGUMENT) throw nb::value_error(message.c_str());
  if (status == ARMS_PEER_TIMEOUT) {
    PyErr_SetString(PyExc_TimeoutError, message.c_str());
    throw nb::python_error();
  }
  throw std::runtime_error(message);
}

ArmsSegment segment(uintptr_t in, uintptr_t out, uintptr_t weight, int weight_dtype, int64_t in_stride,
                    int64_t out_stride, int width, int full_width) {
  ArmsSegment s = {};
  s.in = reinterpret_cast<const void*>(in);
  s.out = reinterpret_cast<void*>(out);
  s.weight = reinterpret_cast<const void*>(weight);
  s.in_row_stride = in_stride;
  s.out_row_stride = out_stride;
  s.width = width;
  s.full_width = full_width;
  s.weight_dtype = weight_dtype;
  return s;
}

// The launch arguments besides the segments.
ArmsNormArgs call_args(int mode, int op, int device, int dtype, int64_t tokens, float eps, uintptr_t stats,
                       uintptr_t stream) {
  ArmsNormArgs a = {};
  a.dtype = dtype;
  a.tokens = tokens;
  a.eps = eps;
  a.mode = mode;
  a.op = op;
  a.device = device;
  a.stats = reinterpret_cast<float*>(stats);
  a.stream = reinterpret_cast<void*>(stream);
  return a;
}

ArmsNormArgs norm_args(int mode, int op, int device, int dtype, int64_t tokens, float eps, uintptr_t stats,
                       uintptr_t stream, uintptr_t in0, uintptr_t out0, uintptr_t w0, int wdt0, int64_t is0,
                       int64_t os0, int width0, int full0, uintptr_t in1, uintptr_t out1, uintptr_t w1, int wdt1,
                       int64_t is1, int64_t os1, int width1, int full1) {
  ArmsNormArgs a = call_args(mode, op, device, dtype, tokens, eps, stats, stream);
  a.segment[0] = segment(in0, out0, w0, wdt0, is0, os0, width0, full0);
  a.num_segments = 1;
  if (in1) {
    a.segment[1] = segment(in1, out1, w1, wdt1, is1, os1, width1, full1);
    a.num_segments = 2;
  }
  return a;
}

nb::dict plan_dict(const ArmsBackendApi& api, const ArmsNormArgs& a, int capacity) {
  ArmsPlan plan = {};
  check(api, api.plan(&a, capacity, &plan));
  nb::dict d;
  d["warps_per_token"] = plan.warps_per_token;
  d["vectors_per_thread"] = plan.vectors_per_thread;
  d["vector_elems"] = plan.vector_elems;
  d["grid"] = plan.grid;
  d["block"] = plan.warps_per_token * api.warp_size();
  d["launches"] = plan.launches;
  d["pdl"] = plan.pdl != 0;
  d["prefetch_rows"] = plan.prefetch_rows;
  d["early_weights"] = plan.early_weights != 0;
  d["epoch_per_block"] = plan.epoch_per_block != 0;
  d["prewait_prefetch_rows"] = plan.prewait_prefetch_rows;
  return d;
}

// One rank's Lamport workspace, owned by Python (allreduce_rms.Workspace wraps it).
class NativeWorkspace {
 public:
  NativeWorkspace(int device_type, int device, int rank, int nranks, int capacity, int64_t timeout_ns)
      : api_(&backend(device_type)), device_type_(device_type), device_(device) {
    check(*api_, api_->workspace_create(device, rank, nranks, capacity, timeout_ns, &ws_));
    hot_ops::workspace_opened(ws_);
  }
  ~NativeWorkspace() { close(); }

  nb::bytes ipc_handle() {
    uint8_t handle[ARMS_IPC_HANDLE_BYTES];
    check(*api_, api_->workspace_ipc_handle(live(), handle));
    return nb::bytes(reinterpret_cast<const char*>(handle), sizeof(handle));
  }

  void open_peers(const std::vector<nb::bytes>& handles) {
    std::vector<uint8_t> all;
    for (const nb::bytes& h : handles) {
      if (h.size() != ARMS_IPC_HANDLE_BYTES) throw nb::value_error("IPC handles must be 64 bytes each");
      const uint8_t* p = static_cast<const uint8_t*>(h.data());
      all.insert(all.end(), p, p + ARMS_IPC_HANDLE_BYTES);
    }
    check(*api_, api_->workspace_open_peers(live(), all.data()));
  }

  bool probe(uint32_t nonce, int64_t timeout_ns, bool drop_peer_writes) {
    int arrived = 0;
    check(*api_, api_->workspace_probe(live(), nonce, timeout_ns, drop_peer_writes ? 1 : 0, &arrived));
    return arrived != 0;
  }

  nb::dict fault() {
    ArmsFault f = {};
    check(*api_, api_->workspace_fault(live(), &f));
    nb::dict d;
    d["failed"] = f.failed != 0;
    d["op"] = f.op == ARMS_OP_QK_NORM ? "qk_norm" : (f.op == ARMS_OP_RMS_NORM ? "rms_norm" : "");
    d["rank"] = f.rank;
    d["peer"] = f.peer;
    d["call"] = f.epoch;
    d["tokens"] = f.tokens;
    return d;
  }

  nb::dict info() {
    ArmsWorkspaceInfo i = {};
    check(*api_, api_->workspace_info(live(), &i));
    nb::dict d;
    d["calls"] = i.epoch;
    d["capacity"] = i.capacity;
    d["buffer_bytes"] = i.buffer_bytes;
    d["peers_open"] = i.peers_open;
    return d;
  }

  // The fused launch: one segment (rms_norm) or two (qk_norm); pointers as integers.
  void launch(int op, int dtype, int64_t tokens, float eps, uintptr_t stream, uintptr_t in0, uintptr_t out0,
              uintptr_t w0, int wdt0, int64_t is0, int64_t os0, int width0, int full0, uintptr_t in1, uintptr_t out1,
              uintptr_t w1, int wdt1, int64_t is1, int64_t os1, int width1, int full1) {
    launch_args(norm_args(ARMS_MODE_LAMPORT, op, device_, dtype, tokens, eps, 0, stream, in0, out0, w0, wdt0, is0, os0,
                          width0, full0, in1, out1, w1, wdt1, is1, os1, width1, full1));
  }
  void launch_args(const ArmsNormArgs& a) { check(*api_, api_->fused_norm(live(), &a)); }

  // The plan the fused launch with these arguments would use (for the benchmark's record).
  nb::dict plan(int op, int dtype, int64_t tokens, uintptr_t in0, uintptr_t out0, uintptr_t w0, int wdt0, int64_t is0,
                int64_t os0, int width0, int full0, uintptr_t in1, uintptr_t out1, uintptr_t w1, int wdt1, int64_t is1,
                int64_t os1, int width1, int full1) {
    ArmsWorkspaceInfo i = {};
    check(*api_, api_->workspace_info(live(), &i));
    const ArmsNormArgs a = norm_args(ARMS_MODE_LAMPORT, op, device_, dtype, tokens, 0.f, 0, 0, in0, out0, w0, wdt0,
                                     is0, os0, width0, full0, in1, out1, w1, wdt1, is1, os1, width1, full1);
    return plan_dict(*api_, a, i.capacity);
  }

  // Profiling: block 0 of every later fused launch writes its phase timestamps into `trace`
  // (device memory of depth * TRACE_POINTS int64; in a trace build every block also raises words
  // 6 and 7: backend_api.h); trace = 0 turns it off.
  void set_trace(uintptr_t trace, int depth) {
    check(*api_, api_->workspace_trace(live(), reinterpret_cast<uint64_t*>(trace), depth));
  }

  // One floor-probe launch: kind FLOOR_EMPTY or FLOOR_EXCHANGE (see backend_api.h).
  void floor(int kind, uintptr_t stream) { check(*api_, api_->floor_launch(live(), kind, reinterpret_cast<void*>(stream))); }

  void close() {
    if (ws_) {
      hot_ops::forget_workspace(ws_);  // no torch hot op may launch on it any more
      api_->workspace_destroy(ws_);
      ws_ = nullptr;
    }
  }
  bool closed() const { return ws_ == nullptr; }
  int device_type() const { return device_type_; }
  const ArmsBackendApi* api() const { return api_; }
  ArmsWorkspace* handle() { return live(); }

 private:
  ArmsWorkspace* live() {
    if (!ws_) throw std::runtime_error("allreduce_rms: workspace used after close()");
    return ws_;
  }
  const ArmsBackendApi* api_;
  ArmsWorkspace* ws_ = nullptr;
  int device_type_;
  int device_;
};

void launch_local(int device_type, int device, int mode, int dtype, int64_t tokens, float eps, uintptr_t stats,
                  uintptr_t stream, uintptr_t in0, uintptr_t out0, uintptr_t w0, int wdt0, int64_t is0, int64_t os0,
                  int width0, int full0, uintptr_t in1, uintptr_t out1, uintptr_t w1, int wdt1, int64_t is1,
                  int64_t os1, int width1, int full1) {
  const ArmsBackendApi& api = backend(device_type);
  const ArmsNormArgs a = norm_args(mode, in1 ? ARMS_OP_QK_NORM : ARMS_OP_RMS_NORM, device, dtype, tokens, eps, stats,
                                   stream, in0, out0, w0, wdt0, is0, os0, width0, full0, in1, out1, w1, wdt1, is1, os1,
                                   width1, full1);
  check(api, api.norm(&a));
}

// One validated call shape of the torch hot path (allreduce_rms._hot_path): everything but the
// stream, the token count and the pointers (op, dtype, eps, widths, row strides, weight dtypes)
// is fixed when the Python layer first validates a call of this shape, so each later call of the
// same shape crosses into C++ with seven integers instead of twenty-one. The backend still checks
// every call's pointers (alignment picks the vector width) and picks the plan.
class PreparedNorm {
 public:
  // workspace: a NativeWorkspace for a fused launch, None for a local one (one rank).
  PreparedNorm(nb::object workspace, int device_type, int device, int op, int dtype, float eps,
               int wdt0, int64_t is0, int64_t os0, int width0, int full0, int64_t in1_offset, int wdt1, int64_t is1,
               int64_t os1, int width1, int full1)
      : workspace_(std::move(workspace)), api_(&backend(device_type)), in1_offset_(in1_offset) {
    if (!workspace_.is_none()) ws_ = nb::cast<NativeWorkspace*>(workspace_);
    const bool two = op == ARMS_OP_QK_NORM;
    // placeholder pointers (1): the real ones arrive with each call
    args_ = norm_args(ws_ ? ARMS_MODE_LAMPORT : ARMS_MODE_LOCAL, op, device, dtype, 0, eps, 0, 0, 1, 1, 1, wdt0,
                      is0, os0, width0, full0, two ? 1 : 0, 1, 1, wdt1, is1, os1, width1, full1);
  }

  // tokens: rows of this call; in: the input rows (segment 1 starts in1_offset bytes further);
  // out0/out1, w0/w1: the segments' outputs and weights (out1, w1 ignored for one segment).
  void operator()(uintptr_t stream, int64_t tokens, uintptr_t in, uintptr_t out0, uintptr_t out1, uintptr_t w0,
                  uintptr_t w1) {
    ArmsNormArgs a = args_;
    a.stream = reinterpret_cast<void*>(stream);
    a.tokens = tokens;
    a.segment[0].in = reinterpret_cast<const void*>(in);
    a.segment[0].out = reinterpret_cast<void*>(out0);
    a.segment[0].weight = reinterpret_cast<const void*>(w0);
    if (a.num_segments == 2) {
      a.segment[1].in = reinterpret_cast<const void*>(in + in1_offset_);
      a.segment[1].out = reinterpret_cast<void*>(out1);
      a.segment[1].weight = reinterpret_cast<const void*>(w1);
    }
    if (ws_) {
      ws_->launch_args(a);
    } else {
      check(*api_, api_->norm(&a));
    }
  }

  // The next torch hot op called on this thread remembers its call shape with this launch
  // (hot_ops.h); calls of more than max_tokens tokens are left to the Python layer.
  void stage(int64_t max_tokens) {
    hot_ops::Launch launch;
    launch.api = ws_ ? ws_->api() : api_;
    launch.workspace = ws_ ? ws_->handle() : nullptr;
    launch.args = args_;
    launch.in1_offset = in1_offset_;
    launch.max_tokens = max_tokens;
    hot_ops::stage(launch);
  }

 private:
  nb::object workspace_;  // keeps the NativeWorkspace alive (its close() still makes calls fail)
  NativeWorkspace* ws_ = nullptr;
  const ArmsBackendApi* api_;
  int64_t in1_offset_;
  ArmsNormArgs args_;
};

// One segment of a variant launch, as the Python layer passes it: (in, out, weight, weight dtype,
// in row stride, out row stride, width, full width (the divisor), gate, gate row stride, gate
// dtype, ArmsVariantFlags, weight offset, groups in a row).
using VariantSegment = std::tuple<uintptr_t, uintptr_t, uintptr_t, int, int64_t, int64_t, int, int, uintptr_t, int64_t,
                                  int, int, float, int>;

// A launch with the norm variants (ABI 4): fused on `workspace` (a NativeWorkspace) or, with
// None, a local launch in `mode` (LOCAL, STATS_OUT, STATS_IN). rank_group: see ArmsNormArgs.
void launch_variant(nb::object workspace, int device_type, int device, int mode, int dtype, int64_t tokens, float eps,
                    uintptr_t stats, uintptr_t stream, int rank_group, const std::vector<VariantSegment>& segments) {
  if (segments.empty() || segments.size() > ARMS_MAX_SEGMENTS) throw nb::value_error("one or two segments");
  ArmsNormArgs a = call_args(workspace.is_none() ? mode : ARMS_MODE_LAMPORT,
                             segments.size() == 2 ? ARMS_OP_QK_NORM : ARMS_OP_RMS_NORM, device, dtype, tokens, eps,
                             stats, stream);
  a.rank_group = rank_group;
  a.num_segments = static_cast<int32_t>(segments.size());
  for (size_t i = 0; i < segments.size(); ++i) {
    const auto& [in, out, w, wdt, is, os, width, full, gate, gs, gdt, flags, offset, groups] = segments[i];
    ArmsSegment& g = a.segment[i];
    g = segment(in, out, w, wdt, is, os, width, full);
    g.gate = reinterpret_cast<const void*>(gate);
    g.gate_row_stride = gs;
    g.gate_dtype = gdt;
    g.flags = flags;
    g.weight_offset = offset;
    g.groups_in_row = groups;
  }
  if (workspace.is_none()) {
    const ArmsBackendApi& api = backend(device_type);
    check(api, api.norm(&a));
  } else {
    nb::cast<NativeWorkspace*>(workspace)->launch_args(a);
  }
}

// Tuning: force the plan of every later launch of this backend (0, 0, 0, -1, -1, -1: automatic).
void set_plan_override(int device_type, int warps_per_token, int vectors_per_thread, int tokens_per_block,
                       int prefetch_rows, int early_weights, int epoch_per_block) {
  const ArmsBackendApi& api = backend(device_type);
  check(api, api.set_plan_override(warps_per_token, vectors_per_thread, tokens_per_block, prefetch_rows, early_weights,
                                   epoch_per_block));
}

int dtype_code(const nb::dlpack::dtype& dt, const char* name) {
  if (dt == nb::dtype<float>()) return ARMS_F32;
  if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 16 && dt.lanes == 1) return ARMS_F16;
  if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16 && dt.lanes == 1) return ARMS_BF16;
  throw nb::value_error((std::string(name) + ": dtype must be float32, float16 or bfloat16").c_str());
}

// Plain (single-rank) RMSNorm over the last dimension of a 2-D tensor, for any DLPack producer.
void rms_norm_dlpack(nb::ndarray<nb::ndim<2>> x, nb::ndarray<nb::ndim<1>> weight, nb::ndarray<nb::ndim<2>> out,
                     float eps, uintptr_t stream) {
  const int device_type = x.device_type();
  if (weight.device_type() != device_type || out.device_type() != device_type || weight.device_id() != x.device_id() ||
      out.device_id() != x.device_id())
    throw nb::value_error("x, weight and out must be on the same device");
  const int dtype = dtype_code(x.dtype(), "x");
  if (dtype_code(out.dtype(), "out") != dtype) throw nb::value_error("out must have the dtype of x");
  const int wdtype = dtype_code(weight.dtype(), "weight");
  if (x.stride(1) != 1 || out.stride(1) != 1) throw nb::value_error("x and out must have unit stride in the last dimension");
  if (weight.stride(0) != 1) throw nb::value_error("weight must be contiguous");
  if (out.shape(0) != x.shape(0) || out.shape(1) != x.shape(1)) throw nb::value_error("out must have the shape of x");
  if (weight.shape(0) != x.shape(1)) throw nb::value_error("weight must have x.shape[1] elements");
  const int width = static_cast<int>(x.shape(1));
  launch_local(device_type, x.device_id(), ARMS_MODE_LOCAL, dtype, static_cast<int64_t>(x.shape(0)), eps, 0, stream,
               reinterpret_cast<uintptr_t>(x.data()), reinterpret_cast<uintptr_t>(out.data()),
               reinterpret_cast<uintptr_t>(weight.data()), wdtype, x.stride(0), out.stride(0), width, width, 0, 0, 0,
               0, 0, 0, 0, 0);
}

nb::dict backend_status(int device_type) {
  const BackendSlot& slot = backends[slot_for_device_type(device_type)];
  nb::dict d;
  d["loaded"] = slot.api != nullptr;
  d["error"] = slot.error;
  if (slot.api) {
    int count = 0;
    const bool counted = slot.api->device_count(&count) == ARMS_OK;
    d["devices"] = counted ? count : 0;
    // why the runtime found no device (no driver, a driver too old, none visible), or ""
    d["device_error"] = counted ? std::string() : std::string(slot.api->last_error());
    d["warp_size"] = slot.api->warp_size();
    d["name"] = slot.api->name;
  }
  return d;
}

// Process-wide counters of one backend (raises when it is not loaded, like every other call).
nb::dict backend_resources(int device_type) {
  const ArmsBackendApi& api = backend(device_type);
  ArmsBackendResources r = {};
  check(api, api.resources(&r));
  nb::dict d;
  d["workspaces_live"] = r.workspaces_live;
  d["ipc_mappings_open"] = r.ipc_mappings_open;
  d["device_bytes"] = r.device_bytes;
  return d;
}

}  // namespace

NB_MODULE(_front, m) {
  m.doc() = "allreduce_rms front module: DLPack validation and backend dispatch (no libtorch).";
  m.attr("ABI_VERSION") = ARMS_BACKEND_ABI_VERSION;
  m.attr("DL_CUDA") = kDLCUDA;
  m.attr("DL_ROCM") = kDLROCM;
  m.attr("MODE_LOCAL") = static_cast<int>(ARMS_MODE_LOCAL);
  m.attr("MODE_STATS_OUT") = static_cast<int>(ARMS_MODE_STATS_OUT);
  m.attr("MODE_STATS_IN") = static_cast<int>(ARMS_MODE_STATS_IN);
  m.attr("OP_RMS_NORM") = static_cast<int>(ARMS_OP_RMS_NORM);
  m.attr("OP_QK_NORM") = static_cast<int>(ARMS_OP_QK_NORM);
  m.attr("MAX_RANKS") = ARMS_MAX_RANKS;

  m.def("load_backend", &load_backend, nb::arg("device_type"), nb::arg("path"),
        "Load the backend library for a DLPack device type; returns '' or why it failed.");
  m.def("backend_status", &backend_status, nb::arg("device_type"),
        "loaded, error, and for a loaded backend devices, device_error (why 0), warp_size, name.");
  nb::dict build_notes;
  build_notes["cuda"] = ARMS_CUDA_BUILD_NOTE;
  build_notes["hip"] = ARMS_HIP_BUILD_NOTE;
  m.attr("BUILD_NOTES") = build_notes;
  m.def("backend_resources", &backend_resources, nb::arg("device_type"),
        "Live workspaces, open peer IPC mappings and workspace device bytes, over the whole process.");
  m.def("launch_local", &launch_local, "Local launch (no communication) with raw pointers.");
  m.def("register_hot_ops", &hot_ops::register_ops, nb::arg("torch_libraries"),
        "Register the kernels of allreduce_rms::_rms_norm_hot/_qk_norm_hot through torch's stable C ABI, "
        "resolved from these already-loaded libtorch files; returns '' or why not.");
  m.def("hot_unstage", &hot_ops::unstage, "Drop a launch staged by PreparedNorm.stage that no hot op took.");
  m.def("hot_forget", &hot_ops::forget_workspace_id, nb::arg("workspace_id"),
        "Forget every call shape the torch hot ops remember for this workspace id.");
  m.def("hot_remembered", &hot_ops::remembered, "Call shapes the torch hot ops remember now.");
  m.def("hot_failure", &hot_ops::failure,
        "The runtime's message for this thread's last hot-op call that returned status 2 (failed).");
  m.def("launch_variant", &launch_variant, nb::arg("workspace").none(), nb::arg("device_type"), nb::arg("device"),
        nb::arg("mode"), nb::arg("dtype"), nb::arg("tokens"), nb::arg("eps"), nb::arg("stats"), nb::arg("stream"),
        nb::arg("rank_group"), nb::arg("segments"),
        "A launch with the norm variants: fused on a NativeWorkspace, or local (None) in `mode`; "
        "segments: (in, out, weight, weight_dtype, in_stride, out_stride, width, full_width, gate, gate_stride, "
        "gate_dtype, flags, weight_offset, groups_in_row) per segment.");
  m.attr("GATE_BEFORE") = static_cast<int>(ARMS_GATE_BEFORE);
  m.attr("GATE_AFTER") = static_cast<int>(ARMS_GATE_AFTER);
  m.attr("GATE_SIGMOID") = static_cast<int>(ARMS_GATE_SIGMOID);
  m.attr("WEIGHT_IN_INPUT_DTYPE") = static_cast<int>(ARMS_WEIGHT_IN_INPUT_DTYPE);
  m.def("set_plan_override", &set_plan_override, nb::arg("device_type"), nb::arg("warps_per_token"),
        nb::arg("vectors_per_thread"), nb::arg("tokens_per_block") = 0, nb::arg("prefetch_rows") = -1,
        nb::arg("early_weights") = -1, nb::arg("epoch_per_block") = -1,
        "Tuning: force warps per token, vectors per thread and tokens per block (0: automatic), the L2\n"
        "prefetch distance in grid strides, early weights and one epoch reader per block (0 or 1) (-1: automatic).");
  m.attr("TRACE_POINTS") = ARMS_TRACE_POINTS;
  m.attr("FLOOR_EMPTY") = static_cast<int>(ARMS_FLOOR_EMPTY);
  m.attr("FLOOR_EXCHANGE") = static_cast<int>(ARMS_FLOOR_EXCHANGE);
  m.def("rms_norm", &rms_norm_dlpack, nb::arg("x"), nb::arg("weight"), nb::arg("out"), nb::arg("eps"),
        nb::arg("stream") = 0, "Single-rank RMSNorm of a 2-D DLPack tensor into out.");

  nb::class_<NativeWorkspace>(m, "NativeWorkspace")
      .def(nb::init<int, int, int, int, int, int64_t>(), nb::arg("device_type"), nb::arg("device"), nb::arg("rank"),
           nb::arg("nranks"), nb::arg("capacity"), nb::arg("timeout_ns"))
      .def("ipc_handle", &NativeWorkspace::ipc_handle)
      .def("open_peers", &NativeWorkspace::open_peers)
      .def("probe", &NativeWorkspace::probe, nb::arg("nonce"), nb::arg("timeout_ns"), nb::arg("drop_peer_writes"))
      .def("fault", &NativeWorkspace::fault)
      .def("info", &NativeWorkspace::info)
      .def("launch", &NativeWorkspace::launch)
      .def("plan", &NativeWorkspace::plan)
      .def("set_trace", &NativeWorkspace::set_trace, nb::arg("trace"), nb::arg("depth"))
      .def("floor", &NativeWorkspace::floor, nb::arg("kind"), nb::arg("stream"))
      .def("close", &NativeWorkspace::close)
      .def_prop_ro("closed", &NativeWorkspace::closed);

  nb::class_<PreparedNorm>(m, "PreparedNorm")
      .def(nb::init<nb::object, int, int, int, int, float, int, int64_t, int64_t, int, int, int64_t, int, int64_t,
                    int64_t, int, int>(),
           nb::arg("workspace").none(), nb::arg("device_type"), nb::arg("device"), nb::arg("op"), nb::arg("dtype"),
           nb::arg("eps"), nb::arg("weight_dtype0"), nb::arg("in_stride0"), nb::arg("out_stride0"),
           nb::arg("width0"), nb::arg("full_width0"), nb::arg("in1_offset"), nb::arg("weight_dtype1"),
           nb::arg("in_stride1"), nb::arg("out_stride1"), nb::arg("width1"), nb::arg("full_width1"))
      .def("stage", &PreparedNorm::stage, nb::arg("max_tokens"),
           "Stage this launch for the next torch hot op called on this thread (it remembers the call's shape).")
      .def("__call__", &PreparedNorm::operator(), nb::arg("stream"), nb::arg("tokens"), nb::arg("x"), nb::arg("out0"), nb::arg("out1"),
           nb::arg("weight0"), nb::arg("weight1"),
           "Launch on `stream`: x (segment 1 at x + in1_offset bytes), the outputs and the weights.");
}

// The torch hot ops (hot_ops.h): one dispatcher call per eager call of a validated call shape.
//
//   allreduce_rms::_rms_norm_hot(Tensor(a!) x, Tensor weight, float eps, int workspace, bool inplace)
//       -> (Tensor out, int status)
//   allreduce_rms::_qk_norm_hot(Tensor(a!) qkv, Tensor q_weight, Tensor k_weight, int q_size, int kv_size,
//       float eps, int workspace, bool inplace) -> (Tensor q, Tensor k, int status)
//
// (schemas defined by allreduce_rms._hot_path; `workspace` is a Workspace's hot-path id, 0 for
// none). A call is served when its key, everything the Python layer's validation looked at
// except the token count, matches a remembered call shape: the same checks on the same values
// give the same answer, so the call is valid by construction. Otherwise the op returns
// kNotServed with its first input as every tensor result, launches nothing, and the Python
// layer takes its full path: validation with its own errors (ValueError, TypeError,
// WorkspaceError, TimeoutError), then stage() + this op again, which remembers the shape.
//
// A kernel here never throws: an argument it cannot describe, an allocation the runtime refuses,
// a backend that rejects the launch before making it (bad pointers, a peer fault recorded on the
// workspace) are kNotServed, and the Python path reports them with the right exception type. A
// launch that failed in the runtime (possibly after some chunks ran) is kFailed: it must not be
// made again, so the Python layer raises RuntimeError with failure() as its message. The kernels
// run without the GIL and touch no Python object.
#include "hot_ops.h"

#include <pthread.h>

#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "torch_abi.h"

namespace hot_ops {

namespace {

using torch_abi::StableIValue;
using torch_abi::TensorHandle;

torch_abi::Functions torch_fn = {};
bool ops_registered = false;

constexpr size_t kMaxEntries = 256;  // call shapes remembered in all; a full table is cleared and refilled

// What validation of a call depended on besides the token count and the pointers (the backend
// checks pointer alignment on every launch). All int64 so that the struct has no padding and
// compares and hashes as bytes.
struct Key {
  int64_t op, inplace, workspace_id, eps_bits, q_size, kv_size;
  int64_t x[6];          // torch dtype, device type, device index, width, row stride, column stride
  int64_t weight[2][5];  // per weight: torch dtype, device type, device index, size, stride (k: zeros for rms_norm)
  bool operator==(const Key& other) const { return std::memcmp(this, &other, sizeof(Key)) == 0; }
};
static_assert(sizeof(Key) == 22 * sizeof(int64_t), "Key must have no padding");

struct KeyHash {
  size_t operator()(const Key& key) const {
    const auto* words = reinterpret_cast<const uint64_t*>(&key);
    uint64_t h = 1469598103934665603ull;  // FNV-1a over 64-bit words
    for (size_t i = 0; i < sizeof(Key) / sizeof(uint64_t); ++i) h = (h ^ words[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

// Guards the three sets below. Held for lookups, inserts and each launch (so that a workspace is
// never destroyed while a launch on it is being made), never while anything could need the GIL:
// the outputs are allocated outside it (an allocation may call into Python, e.g. for torch's
// memory-history recording), and the threads that take it while holding the GIL (fork, forget,
// close) would otherwise deadlock with such a call.
std::mutex table_mutex;
std::unordered_map<Key, Launch, KeyHash> table;
std::unordered_set<const ArmsWorkspace*> live_workspaces;  // opened and not yet destroyed
std::unordered_set<int64_t> forgotten_ids;  // closed Python workspaces (ids are never reused)
thread_local Launch staged_launch;
thread_local bool has_staged = false;
thread_local std::string last_failure;  // the runtime's message for this thread's last kFailed call

constexpr int64_t kNotServed = 0, kServed = 1, kFailed = 2;  // the ops' status result

// ------------------------------------------------------------------------- stack values
template <typename T>
T arg(StableIValue v) {  // int64_t, double, TensorHandle: the whole word; bool: its low byte
  T out;
  std::memcpy(&out, &v, sizeof(T));
  return out;
}

template <typename T>
StableIValue result(T value) {
  StableIValue v = 0;
  std::memcpy(&v, &value, sizeof(T));
  return v;
}

// The call's owning tensor handles: deleted when the call ends unless released into a result.
struct OwnedTensors {
  TensorHandle h[3] = {};
  OwnedTensors() = default;
  OwnedTensors(const OwnedTensors&) = delete;
  OwnedTensors& operator=(const OwnedTensors&) = delete;
  ~OwnedTensors() {
    for (TensorHandle t : h)
      if (t) torch_fn.delete_tensor_object(t);
  }
  TensorHandle release(int i) {
    TensorHandle t = h[i];
    h[i] = nullptr;
    return t;
  }
};

// ------------------------------------------------------------------------- keys
// The metadata of a tensor with `dim` dimensions, as the key holds it: dtype, device type,
// device index, then the last dimension's size and every stride; false for another rank.
bool describe(TensorHandle t, int64_t dim, int64_t* out, int64_t** sizes) {
  int64_t d = 0, *strides = nullptr;
  int32_t dtype = 0, device_type = 0, device_index = 0;
  if (torch_fn.get_dim(t, &d) || d != dim || torch_fn.get_sizes(t, sizes) || torch_fn.get_strides(t, &strides) ||
      torch_fn.get_dtype(t, &dtype) || torch_fn.get_device_type(t, &device_type) ||
      torch_fn.get_device_index(t, &device_index))
    return false;
  out[0] = dtype;
  out[1] = device_type;
  out[2] = device_index;
  out[3] = (*sizes)[dim - 1];
  for (int64_t i = 0; i < dim; ++i) out[4 + i] = strides[i];
  return true;
}

// x as [tokens, width] rows (other shapes take the Python path every time).
bool describe_rows(TensorHandle t, int64_t out[6], int64_t* tokens) {
  int64_t* sizes = nullptr;
  if (!describe(t, 2, out, &sizes)) return false;
  *tokens = sizes[0];
  return true;
}

// A weight: 1-D (validation accepts nothing else).
bool describe_weight(TensorHandle t, int64_t out[5]) {
  int64_t* sizes = nullptr;
  return describe(t, 1, out, &sizes);
}

// The address of t's first element, or nullptr when t has no memory behind it: a fake or meta
// tensor (whose data pointer is its storage offset in bytes, not null, for a view) or a dtype the
// kernels do not take.
char* data_of(TensorHandle t) {
  void* p = nullptr;
  int64_t offset = 0;
  int32_t dtype = 0;
  if (torch_fn.get_data_ptr(t, &p) || torch_fn.get_storage_offset(t, &offset) || torch_fn.get_dtype(t, &dtype))
    return nullptr;
  const int64_t size = dtype == torch_fn.dtype_float32 ? 4
                       : dtype == torch_fn.dtype_float16 || dtype == torch_fn.dtype_bfloat16 ? 2 : 0;
  char* data = static_cast<char*>(p);
  return size == 0 || data == nullptr || data - offset * size == nullptr ? nullptr : data;
}

// ------------------------------------------------------------------------- serving
// One call: x's rows, the weights, and the output widths (one for rms_norm, two for qk_norm).
struct Call {
  Key key = {};
  int64_t tokens = 0;
  TensorHandle x = nullptr;
  TensorHandle weight[2] = {};
  int num_outputs = 1;
  int64_t out_width[2] = {};
};

// The call's tensor results in outs: views of x's columns from `column` (in place; rms_norm in
// place returns x itself and makes none), else new rows, both of qk_norm's in one allocation
// (measured on an H200 host: 2.2 us per aoti_torch_empty_strided, a view well under half that).
// false, with nothing kept, when the runtime refuses.
bool make_outputs(const Call& call, TensorHandle outs[2]) {
  const int64_t column[2] = {0, call.key.q_size};  // in place: q from column 0, k after q
  // out of place: k's rows start on a 128-element boundary, so that k is as aligned as a tensor
  // of its own would be (the backend picks the vector width from the pointers)
  const int64_t k_start = (call.tokens * call.out_width[0] + 127) / 128 * 128;
  TensorHandle block = nullptr;
  if (!call.key.inplace && call.num_outputs > 0) {
    const int64_t elems = call.num_outputs == 2 ? k_start + call.tokens * call.out_width[1]
                                                : call.tokens * call.out_width[0];
    const int64_t stride = 1;
    if (torch_fn.empty_strided(1, &elems, &stride, static_cast<int32_t>(call.key.x[0]),
                               static_cast<int32_t>(call.key.x[1]), static_cast<int32_t>(call.key.x[2]), &block))
      return false;
  }
  const int64_t start[2] = {0, k_start};  // out of place: q's rows, then k's
  bool ok = true;
  for (int i = 0; i < call.num_outputs && ok; ++i) {
    const int64_t sizes[2] = {call.tokens, call.out_width[i]};
    const int64_t strides[2] = {call.key.inplace ? call.key.x[4] : call.out_width[i], 1};
    ok = torch_fn.reinterpret_tensor(call.key.inplace ? call.x : block, 2, sizes, strides,
                                     call.key.inplace ? column[i] : start[i], &outs[i]) == torch_abi::kSuccess;
  }
  if (block) torch_fn.delete_tensor_object(block);  // the results keep its storage alive
  for (int i = 0; i < call.num_outputs && !ok; ++i) {
    if (outs[i]) torch_fn.delete_tensor_object(outs[i]);
    outs[i] = nullptr;
  }
  return ok;
}

// The launch staged for this call, if any, taken when the kernel starts: a call that cannot be
// described (and so is not served) must not leave it for a later call of another shape.
const Launch* take_staged(Launch* copy) {
  if (!has_staged) return nullptr;
  has_staged = false;
  *copy = staged_launch;
  return copy;
}

// A staged launch may be remembered only while its workspace is open: a close() that ran between
// the Python validation and this call must not leave a launch on a destroyed workspace behind.
bool still_open(const Launch& launch, int64_t workspace_id) {
  return !forgotten_ids.count(workspace_id) && (!launch.workspace || live_workspaces.count(launch.workspace));
}

// Launch `call` if its call shape is remembered (remembering it first with `staged`, the launch
// the Python layer prepared after validating exactly this call); returns kServed with outs filled,
// kNotServed having launched nothing and kept no output, or kFailed (see the top of this file).
int64_t serve(const Call& call, const Launch* staged, TensorHandle outs[2]) {
  Launch launch;
  {
    std::lock_guard<std::mutex> lock(table_mutex);
    if (staged && still_open(*staged, call.key.workspace_id)) {
      if (table.size() >= kMaxEntries) table.clear();
      table[call.key] = *staged;
    }
    const auto found = table.find(call.key);
    if (found == table.end() || call.tokens > found->second.max_tokens) return kNotServed;
    launch = found->second;
  }
  void* stream = nullptr;
  char* x = data_of(call.x);
  const char* w0 = data_of(call.weight[0]);
  const char* w1 = launch.args.num_segments == 2 ? data_of(call.weight[1]) : "";
  if ((call.tokens > 0 && (!x || !w0 || !w1)) || !torch_fn.get_current_cuda_stream ||
      torch_fn.get_current_cuda_stream(static_cast<int32_t>(call.key.x[2]), &stream))
    return kNotServed;
  if (!make_outputs(call, outs)) return kNotServed;
  ArmsNormArgs a = launch.args;
  a.stream = stream;
  a.tokens = call.tokens;
  a.segment[0].in = x;
  a.segment[0].weight = w0;
  a.segment[0].out = call.key.inplace ? x : data_of(outs[0]);
  if (a.num_segments == 2) {
    a.segment[1].in = x + launch.in1_offset;
    a.segment[1].weight = w1;
    a.segment[1].out = call.key.inplace ? x + launch.in1_offset : data_of(outs[1]);
  }
  int status = ARMS_INVALID_ARGUMENT;  // (a workspace closed since the lookup: not served)
  {
    std::lock_guard<std::mutex> lock(table_mutex);
    if (!launch.workspace || live_workspaces.count(launch.workspace))
      status = launch.workspace ? launch.api->fused_norm(launch.workspace, &a) : launch.api->norm(&a);
  }
  if (status == ARMS_OK) return kServed;
  for (int i = 0; i < call.num_outputs; ++i) torch_fn.delete_tensor_object(outs[i]);
  if (status == ARMS_RUNTIME_ERROR) {  // the runtime failed, maybe after launching some chunks
    last_failure = launch.api->last_error();
    return kFailed;
  }
  return kNotServed;  // refused before launching: the Python path reports why
}

// The results of a call that was not served: x (a new reference per tensor result) and status.
void not_served(StableIValue* stack, OwnedTensors& in, int tensor_results, int64_t status) {
  TensorHandle x = in.release(0);
  for (int i = 1; i < tensor_results; ++i) {
    TensorHandle again = nullptr;
    torch_fn.new_tensor_handle(x, &again);  // (only allocates the handle)
    stack[i] = result(again);
  }
  stack[0] = result(x);
  stack[tensor_results] = result(status);
}

// _rms_norm_hot(x, weight, eps, workspace, inplace) -> (out, status)
void rms_norm_hot(StableIValue* stack, uint64_t, uint64_t) {
  Launch copy;
  const Launch* staged = take_staged(&copy);
  OwnedTensors in;
  in.h[0] = arg<TensorHandle>(stack[0]);
  in.h[1] = arg<TensorHandle>(stack[1]);
  Call call;
  call.key.op = ARMS_OP_RMS_NORM;
  call.key.eps_bits = arg<int64_t>(stack[2]);
  call.key.workspace_id = arg<int64_t>(stack[3]);
  call.key.inplace = arg<bool>(stack[4]);
  call.x = in.h[0];
  call.weight[0] = in.h[1];
  TensorHandle outs[2] = {};
  int64_t status = kNotServed;
  if (describe_rows(call.x, call.key.x, &call.tokens) && describe_weight(call.weight[0], call.key.weight[0])) {
    call.out_width[0] = call.key.x[3];
    call.num_outputs = call.key.inplace ? 0 : 1;  // in place, the result is x itself
    status = serve(call, staged, outs);
    if (status == kServed) {
      stack[0] = result(call.key.inplace ? in.release(0) : outs[0]);
      stack[1] = result(kServed);
      return;
    }
  }
  not_served(stack, in, 1, status);
}

// _qk_norm_hot(qkv, q_weight, k_weight, q_size, kv_size, eps, workspace, inplace) -> (q, k, status)
void qk_norm_hot(StableIValue* stack, uint64_t, uint64_t) {
  Launch copy;
  const Launch* staged = take_staged(&copy);
  OwnedTensors in;
  for (int i = 0; i < 3; ++i) in.h[i] = arg<TensorHandle>(stack[i]);
  Call call;
  call.key.op = ARMS_OP_QK_NORM;
  call.key.q_size = arg<int64_t>(stack[3]);
  call.key.kv_size = arg<int64_t>(stack[4]);
  call.key.eps_bits = arg<int64_t>(stack[5]);
  call.key.workspace_id = arg<int64_t>(stack[6]);
  call.key.inplace = arg<bool>(stack[7]);
  call.x = in.h[0];
  call.weight[0] = in.h[1];
  call.weight[1] = in.h[2];
  call.num_outputs = 2;
  call.out_width[0] = call.key.q_size;
  call.out_width[1] = call.key.kv_size;
  TensorHandle outs[2] = {};
  int64_t status = kNotServed;
  if (describe_rows(call.x, call.key.x, &call.tokens) && describe_weight(call.weight[0], call.key.weight[0]) &&
      describe_weight(call.weight[1], call.key.weight[1]))
    status = serve(call, staged, outs);
  if (status == kServed) {
    stack[0] = result(outs[0]);
    stack[1] = result(outs[1]);
    stack[2] = result(kServed);
    return;
  }
  not_served(stack, in, 2, status);
}

// fork(): the child must not launch on the parent's workspaces (the CUDA context and the IPC
// mappings do not survive fork), and the mutex must not be left held by a parent thread.
void before_fork() { table_mutex.lock(); }
void after_fork_in_parent() { table_mutex.unlock(); }
void after_fork_in_child() {
  table.clear();
  live_workspaces.clear();
  has_staged = false;
  table_mutex.unlock();
}

}  // namespace

std::string register_ops(const std::vector<std::string>& torch_libraries) {
  if (ops_registered) return "";
  torch_abi::Functions f = {};
  std::string why = torch_abi::resolve(torch_libraries, &f);
  if (!why.empty()) return why;
  torch_fn = f;
  torch_abi::LibraryHandle lib = nullptr;  // kept for the life of the process: it unregisters when deleted
  // CompositeImplicitAutograd: the kernel runs at the autograd key, for every device (a CPU or
  // meta tensor is simply a miss), with no autograd-fallback or view-tracking kernel before it:
  // measured on a CPU torch 2.13, a miss costs about 2.9 us here against 3.0-5.4 us registered at
  // CompositeExplicitAutograd (an nn.Parameter weight made the difference largest). So its
  // results carry no autograd history: the in-place ones are not autograd views of x (the
  // Python path's as_strided views are), and q and k share one allocation.
  if (f.library_init_impl("allreduce_rms", "CompositeImplicitAutograd", __FILE__, __LINE__, &lib) != torch_abi::kSuccess)
    return "torch refused a library for the allreduce_rms kernels";
  const struct {
    const char* name;
    torch_abi::BoxedKernel kernel;
  } kernels[] = {{"_rms_norm_hot", rms_norm_hot}, {"_qk_norm_hot", qk_norm_hot}};
  for (const auto& k : kernels) {
    const torch_abi::Error e = f.library_impl_versioned
                                   ? f.library_impl_versioned(lib, k.name, k.kernel, torch_abi::kBuildVersion_2_10)
                                   : f.library_impl(lib, k.name, k.kernel);
    if (e != torch_abi::kSuccess) return std::string("torch refused the kernel of ") + k.name;
  }
  pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
  ops_registered = true;
  return "";
}

void stage(const Launch& launch) {
  staged_launch = launch;
  has_staged = true;
}

void unstage() { has_staged = false; }

void workspace_opened(const ArmsWorkspace* workspace) {
  std::lock_guard<std::mutex> lock(table_mutex);
  live_workspaces.insert(workspace);
}

std::string failure() { return last_failure; }

void forget_workspace_id(int64_t workspace_id) {
  std::lock_guard<std::mutex> lock(table_mutex);
  if (workspace_id != 0) forgotten_ids.insert(workspace_id);  // 0, calls without a workspace, only forgets
  for (auto it = table.begin(); it != table.end();)
    it = it->first.workspace_id == workspace_id ? table.erase(it) : std::next(it);
}

void forget_workspace(const ArmsWorkspace* workspace) {
  if (!workspace) return;
  std::lock_guard<std::mutex> lock(table_mutex);
  live_workspaces.erase(workspace);
  for (auto it = table.begin(); it != table.end();)
    it = it->second.workspace == workspace ? table.erase(it) : std::next(it);
}

int64_t remembered() {
  std::lock_guard<std::mutex> lock(table_mutex);
  return static_cast<int64_t>(table.size());
}

}  // namespace hot_ops

// The torch hot ops: eager calls of an already-validated call shape served in one C++ kernel
// registered with torch's dispatcher (hot_ops.cpp). The front module (module.cpp) stages the
// launch of each call shape the Python layer has validated; the ops find it again by the call's
// tensor metadata and launch it without any Python work per tensor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend_api.h"

namespace hot_ops {

// One validated call shape's launch: everything but the stream, the token count and the pointers.
struct Launch {
  const ArmsBackendApi* api = nullptr;
  ArmsWorkspace* workspace = nullptr;  // nullptr: a local launch (one rank)
  ArmsNormArgs args = {};              // pointers, stream and tokens are placeholders
  int64_t in1_offset = 0;              // bytes from the row's start to segment 1 (qk_norm: k)
  int64_t max_tokens = 0;              // more tokens in one call are the Python layer's error to raise
};

// Resolve torch's stable C ABI from the libraries at torch_libraries (already loaded by torch)
// and register the kernels of allreduce_rms::_rms_norm_hot and ::_qk_norm_hot, whose schemas the
// Python layer has defined. Returns "" when registered (now or before), else why not.
std::string register_ops(const std::vector<std::string>& torch_libraries);

// The next hot-op call on this thread remembers its call shape (key) with `launch`; unstage()
// drops a staged launch that no call consumed.
void stage(const Launch& launch);
void unstage();

// A native workspace the hot ops may launch on, from its creation until forget_workspace().
void workspace_opened(const ArmsWorkspace* workspace);

// Forget every call shape of workspace id `workspace_id` for good (the Python Workspace was
// closed), or every one that launches on `workspace` (the native workspace is being destroyed;
// no launch on it is being made once this returns).
void forget_workspace_id(int64_t workspace_id);
void forget_workspace(const ArmsWorkspace* workspace);

// The runtime's message for this thread's last call that returned status kFailed (2): its
// launch failed in the GPU runtime, maybe after launching some chunks, and must not be retried.
std::string failure();

// Call shapes remembered now (for tests).
int64_t remembered();

}  // namespace hot_ops

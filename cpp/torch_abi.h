// The part of PyTorch's stable C ABI that the torch hot ops use (hot_ops.cpp), resolved at run
// time with dlsym from the libtorch libraries the running torch has already loaded.
//
// Why not build against torch's headers: the wheel must not depend on any one torch version at
// build time (it builds without torch installed, and one wheel serves every torch >= 2.4). The
// functions below are the stable C ABI's `extern "C"` entry points (torch/csrc/inductor/aoti_torch/
// c/shim.h and torch/csrc/stable/c/shim.h): their names, signatures and meaning are fixed across
// torch versions by design, which is what lets an extension built for torch 2.10 load in later ones.
// A torch that lacks any of them leaves the hot ops unregistered, and every call takes the Python
// path; a CPU-only build lacks only the CUDA stream getter, and its hot ops
// register but serve nothing (there is no GPU launch to serve).
//
// Calling convention of a boxed kernel (StableIValue = uint64_t, one per argument and result):
// a Tensor argument arrives as an owning AtenTensorHandle (the kernel deletes it, or hands it
// back as a result); int as int64_t, float as the bits of a double, bool in the low byte. Results
// go into the same array from index 0; a Tensor result is an owning handle that torch takes over.
// These are the conventions of extension build version 2.10, which is what this module asks for
// when it registers its kernels (torch_library_impl), so newer torches keep applying them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torch_abi {

using Error = int32_t;  // AOTITorchError: 0 is success
using TensorHandle = struct AtenTensorOpaque*;
using LibraryHandle = struct TorchLibraryOpaque*;
using StableIValue = uint64_t;
using BoxedKernel = void (*)(StableIValue* stack, uint64_t num_args, uint64_t num_outputs);

constexpr Error kSuccess = 0;
// (major << 56) | (minor << 48): the extension build version whose conventions this module uses
constexpr uint64_t kBuildVersion_2_10 = (uint64_t{2} << 56) | (uint64_t{10} << 48);

// Entry points, filled by resolve(); all or none.
struct Functions {
  Error (*get_dim)(TensorHandle, int64_t*);
  Error (*get_sizes)(TensorHandle, int64_t**);    // borrowed array of get_dim values
  Error (*get_strides)(TensorHandle, int64_t**);  // borrowed, in elements
  Error (*get_dtype)(TensorHandle, int32_t*);
  Error (*get_device_type)(TensorHandle, int32_t*);
  Error (*get_device_index)(TensorHandle, int32_t*);
  Error (*get_data_ptr)(TensorHandle, void**);  // the first element's address (storage offset included)
  Error (*get_storage_offset)(TensorHandle, int64_t*);  // in elements
  Error (*empty_strided)(int64_t ndim, const int64_t* sizes, const int64_t* strides, int32_t dtype,
                         int32_t device_type, int32_t device_index, TensorHandle* out);
  // a view of self: sizes/strides in elements, storage offset moved by offset_increment elements
  Error (*reinterpret_tensor)(TensorHandle self, int64_t ndim, const int64_t* sizes, const int64_t* strides,
                              int64_t offset_increment, TensorHandle* out);
  Error (*new_tensor_handle)(TensorHandle orig, TensorHandle* out);  // one more owner of orig's tensor
  Error (*delete_tensor_object)(TensorHandle);
  Error (*get_current_cuda_stream)(int32_t device_index, void** stream);  // CUDA and ROCm builds; else nullptr
  Error (*library_init_impl)(const char* ns, const char* dispatch_key, const char* file, uint32_t line,
                             LibraryHandle* out);
  // torch >= 2.10: torch_library_impl(lib, name, fn, extension_build_version); older torches
  // have only aoti_torch_library_impl(lib, name, fn), used when the versioned one is missing
  Error (*library_impl_versioned)(LibraryHandle, const char* name, BoxedKernel, uint64_t build_version);
  Error (*library_impl)(LibraryHandle, const char* name, BoxedKernel);
  int32_t dtype_float32, dtype_float16, dtype_bfloat16;  // torch's ScalarType codes
  int32_t device_type_cuda;                              // torch's DeviceType code of "cuda"
};

// Resolve every entry point from the already-loaded libraries at `paths` (dlopen RTLD_NOLOAD:
// nothing is loaded that torch did not load). Returns "" on success, else what was missing.
std::string resolve(const std::vector<std::string>& paths, Functions* out);

}  // namespace torch_abi

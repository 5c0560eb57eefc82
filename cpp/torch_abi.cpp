// Resolving the stable C ABI entry points of torch_abi.h from the libraries torch has loaded.
#include "torch_abi.h"

#include <dlfcn.h>

#include <type_traits>

namespace torch_abi {

namespace {

// The first of `handles` that exports `name`, as a function pointer of type T (nullptr if none).
template <typename T>
T find(const std::vector<void*>& handles, const char* name) {
  for (void* h : handles)
    if (void* p = dlsym(h, name)) return reinterpret_cast<T>(p);
  return nullptr;
}

}  // namespace

std::string resolve(const std::vector<std::string>& paths, Functions* out) {
  std::vector<void*> handles;
  for (const std::string& path : paths)
    // RTLD_NOLOAD: a handle only to what the process already has (torch loaded it), never a second copy
    if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD)) handles.push_back(h);
  if (handles.empty()) return "none of torch's libraries is loaded";

  Functions f = {};
  std::string missing;
  auto need = [&](auto& slot, const char* name) {
    slot = find<std::remove_reference_t<decltype(slot)>>(handles, name);
    if (!slot) missing += std::string(missing.empty() ? "" : ", ") + name;
  };
  need(f.get_dim, "aoti_torch_get_dim");
  need(f.get_sizes, "aoti_torch_get_sizes");
  need(f.get_strides, "aoti_torch_get_strides");
  need(f.get_dtype, "aoti_torch_get_dtype");
  need(f.get_device_type, "aoti_torch_get_device_type");
  need(f.get_device_index, "aoti_torch_get_device_index");
  need(f.get_data_ptr, "aoti_torch_get_data_ptr");
  need(f.get_storage_offset, "aoti_torch_get_storage_offset");
  need(f.empty_strided, "aoti_torch_empty_strided");
  need(f.reinterpret_tensor, "aoti_torch__reinterpret_tensor");
  need(f.new_tensor_handle, "aoti_torch_new_tensor_handle");
  need(f.delete_tensor_object, "aoti_torch_delete_tensor_object");
  // absent from CPU-only builds: the ops still register (they serve nothing there, having no GPU)
  f.get_current_cuda_stream = find<decltype(f.get_current_cuda_stream)>(handles, "aoti_torch_get_current_cuda_stream");
  need(f.library_init_impl, "aoti_torch_library_init_impl");
  f.library_impl_versioned = find<decltype(f.library_impl_versioned)>(handles, "torch_library_impl");
  f.library_impl = find<decltype(f.library_impl)>(handles, "aoti_torch_library_impl");
  if (!f.library_impl_versioned && !f.library_impl) missing += std::string(missing.empty() ? "" : ", ") + "torch_library_impl";
  using Code = int32_t (*)();
  Code f32 = nullptr, f16 = nullptr, bf16 = nullptr, cuda = nullptr;
  need(f32, "aoti_torch_dtype_float32");
  need(f16, "aoti_torch_dtype_float16");
  need(bf16, "aoti_torch_dtype_bfloat16");
  need(cuda, "aoti_torch_device_type_cuda");
  if (!missing.empty()) return "this torch does not export " + missing;
  f.dtype_float32 = f32();
  f.dtype_float16 = f16();
  f.dtype_bfloat16 = bf16();
  f.device_type_cuda = cuda();
  *out = f;
  return "";
}

}  // namespace torch_abi

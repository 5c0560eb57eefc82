# Find the GPU toolchains and build one backend library per toolchain found (or required).
include(CheckLanguage)

# A backend library exports one symbol, arms_backend_api: hidden visibility alone still leaves
# kernel stubs and libstdc++ template instances exported, so a linker version script decides.
function(arms_export_only_backend_api target)
  if(NOT UNIX OR APPLE)
    return()
  endif()
  set(exports "${CMAKE_CURRENT_BINARY_DIR}/${target}.exports")
  file(CONFIGURE OUTPUT "${exports}" CONTENT "{\n  global: arms_backend_api;\n  local: *;\n};\n")
  target_link_options(${target} PRIVATE "LINKER:--version-script=${exports}")
  set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS "${exports}")
endfunction()

set(ARMS_BUILT_BACKENDS "")
# What the build did with each backend, in words: the front module reports it through
# allreduce_rms.backends(), so a user learns which build option or missing toolchain is the cause.
set(ARMS_CUDA_BUILD_NOTE "not built: configured with ALLREDUCE_RMS_CUDA=OFF")
set(ARMS_HIP_BUILD_NOTE "not built: configured with ALLREDUCE_RMS_HIP=OFF")

# A trace build says so in each backend's note. No ';' in a note: it becomes a compile
# definition, where a ';' would split the list item.
set(arms_trace_note "")
if(ALLREDUCE_RMS_TRACE_ALL_BLOCKS)
  set(arms_trace_note ", a trace build (every block stamps the trace)")
endif()

# CUDA: nvcc compiles cpp/ as is.
if(NOT ALLREDUCE_RMS_CUDA STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    include(CudaBackend)
    list(APPEND ARMS_BUILT_BACKENDS cuda)
    string(REPLACE ";" "," archs "${ALLREDUCE_RMS_CUDA_ARCHS}")
    set(ARMS_CUDA_BUILD_NOTE "built with nvcc ${CMAKE_CUDA_COMPILER_VERSION} for architectures ${archs}${arms_trace_note}")
  elseif(ALLREDUCE_RMS_CUDA STREQUAL "ON")
    message(FATAL_ERROR "ALLREDUCE_RMS_CUDA=ON but no CUDA compiler was found: put nvcc on PATH or set CUDACXX")
  else()
    message(STATUS "allreduce_rms: no nvcc found, skipping the CUDA backend")
    set(ARMS_CUDA_BUILD_NOTE "not built: no CUDA toolchain (nvcc) found at build time (ALLREDUCE_RMS_CUDA=AUTO)")
  endif()
endif()

# HIP: cpp/ is hipified into the build tree, then compiled with hip/ first on the include path.
if(NOT ALLREDUCE_RMS_HIP STREQUAL "OFF")
  check_language(HIP)
  if(CMAKE_HIP_COMPILER)
    include(HipBackend)
    list(APPEND ARMS_BUILT_BACKENDS hip)
    string(REPLACE ";" "," archs "${ALLREDUCE_RMS_HIP_ARCHS}")
    set(ARMS_HIP_BUILD_NOTE "built with ${CMAKE_HIP_COMPILER_ID} ${CMAKE_HIP_COMPILER_VERSION} for architectures ${archs}${arms_trace_note}")
  elseif(ALLREDUCE_RMS_HIP STREQUAL "ON")
    message(FATAL_ERROR "ALLREDUCE_RMS_HIP=ON but no HIP compiler was found: install ROCm (hipcc) or set "
                        "CMAKE_HIP_COMPILER")
  else()
    message(STATUS "allreduce_rms: no HIP compiler found, skipping the HIP backend")
    set(ARMS_HIP_BUILD_NOTE "not built: no HIP toolchain (ROCm hipcc/clang) found at build time (ALLREDUCE_RMS_HIP=AUTO)")
  endif()
endif()
target_compile_definitions(_front PRIVATE "ARMS_CUDA_BUILD_NOTE=\"${ARMS_CUDA_BUILD_NOTE}\""
                                          "ARMS_HIP_BUILD_NOTE=\"${ARMS_HIP_BUILD_NOTE}\"")

if(ARMS_BUILT_BACKENDS STREQUAL "")
  message(STATUS "allreduce_rms: no GPU backend; the package will use its pure-torch fallback only")
else()
  message(STATUS "allreduce_rms: building backends: ${ARMS_BUILT_BACKENDS}")
endif()

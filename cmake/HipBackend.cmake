# libarms_hip.so: cpp/ hipified at build time into the build tree (never the source tree), then
# compiled by the HIP compiler with hip/ first on the include path, so that cpp/platform.h picks
# up hip/platform_hip.h. Exports one symbol, arms_backend_api (cpp/backend_api.h).

# enable_language(HIP) needs some architecture to test the compiler with. Without
# CMAKE_HIP_ARCHITECTURES it asks rocm_agent_enumerator for the GPUs of this machine, and a build
# host without one (a container, CI) then depends on the compiler naming a default target in its
# verbose output, or fails with "Failed to find a default HIP architecture". The library's targets
# are ALLREDUCE_RMS_HIP_ARCHS either way (set on the target below); this only picks the test.
if(NOT DEFINED CMAKE_HIP_ARCHITECTURES)
  if(ALLREDUCE_RMS_HIP_ARCHS STREQUAL "")
    set(CMAKE_HIP_ARCHITECTURES gfx90a)  # known to every clang that compiles HIP for ROCm >= 5
  else()
    list(GET ALLREDUCE_RMS_HIP_ARCHS 0 CMAKE_HIP_ARCHITECTURES)
  endif()
endif()
enable_language(HIP)

# The ROCm release the compiler belongs to picks the default architectures.
set(arms_rocm_version "")
if(DEFINED hip-lang_VERSION)
  set(arms_rocm_version "${hip-lang_VERSION}")
elseif(EXISTS "${CMAKE_HIP_COMPILER_ROCM_ROOT}/include/hip/hip_version.h")
  file(STRINGS "${CMAKE_HIP_COMPILER_ROCM_ROOT}/include/hip/hip_version.h" arms_hip_version_lines
       REGEX "#define HIP_VERSION_(MAJOR|MINOR) ")
  string(REGEX REPLACE ".*HIP_VERSION_MAJOR ([0-9]+).*" "\\1" arms_major "${arms_hip_version_lines}")
  string(REGEX REPLACE ".*HIP_VERSION_MINOR ([0-9]+).*" "\\1" arms_minor "${arms_hip_version_lines}")
  if(arms_major MATCHES "^[0-9]+$" AND arms_minor MATCHES "^[0-9]+$")
    set(arms_rocm_version "${arms_major}.${arms_minor}")
  endif()
endif()

if(ALLREDUCE_RMS_HIP_ARCHS STREQUAL "")
  if(arms_rocm_version STREQUAL "")
    message(STATUS "allreduce_rms: could not tell the ROCm version of ${CMAKE_HIP_COMPILER}; assuming ROCm >= 6 "
                   "(set ALLREDUCE_RMS_HIP_ARCHS to choose the architectures)")
    set(arms_default_archs gfx90a gfx942 gfx950)
  elseif(arms_rocm_version VERSION_GREATER_EQUAL 6)
    set(arms_default_archs gfx90a gfx942 gfx950)
  else()
    set(arms_default_archs gfx90a gfx940)
  endif()
  # A default must not break the build: leave out what this compiler cannot target (gfx950
  # needs a ROCm 6.x newer than 6.0). An explicit ALLREDUCE_RMS_HIP_ARCHS is taken as given.
  set(arms_empty_source "${CMAKE_CURRENT_BINARY_DIR}/arms_arch_probe.c")
  file(WRITE "${arms_empty_source}" "")
  foreach(arch IN LISTS arms_default_archs)
    execute_process(COMMAND "${CMAKE_HIP_COMPILER}" --target=amdgcn-amd-amdhsa -mcpu=${arch} -nogpulib
                            -fsyntax-only -x c "${arms_empty_source}"
                    RESULT_VARIABLE arms_arch_status OUTPUT_QUIET ERROR_QUIET)
    if(arms_arch_status EQUAL 0)
      list(APPEND ALLREDUCE_RMS_HIP_ARCHS ${arch})
    else()
      message(STATUS "allreduce_rms: ${CMAKE_HIP_COMPILER} cannot target ${arch}; leaving it out")
    endif()
  endforeach()
  if(ALLREDUCE_RMS_HIP_ARCHS STREQUAL "")
    message(FATAL_ERROR "allreduce_rms: ${CMAKE_HIP_COMPILER} targets none of ${arms_default_archs}; set "
                        "ALLREDUCE_RMS_HIP_ARCHS, or build without the HIP backend: "
                        "-Ccmake.define.ALLREDUCE_RMS_HIP=OFF")
  endif()
endif()
message(STATUS "allreduce_rms: HIP ${arms_rocm_version} (${CMAKE_HIP_COMPILER_ID} ${CMAKE_HIP_COMPILER_VERSION}), "
               "architectures ${ALLREDUCE_RMS_HIP_ARCHS}")

# Hipify runs in the build Python; check now rather than fail halfway through the build.
execute_process(COMMAND "${Python_EXECUTABLE}" -c "import torch.utils.hipify.hipify_python"
                RESULT_VARIABLE arms_hipify_status OUTPUT_QUIET ERROR_VARIABLE arms_hipify_error)
if(NOT arms_hipify_status EQUAL 0)
  string(STRIP "${arms_hipify_error}" arms_hipify_error)
  string(REGEX REPLACE ".*\n" "" arms_hipify_error "${arms_hipify_error}")  # the exception line
  message(FATAL_ERROR
    "allreduce_rms: the HIP backend is hipified at build time by torch.utils.hipify, which the build "
    "Python cannot import:\n"
    "  ${Python_EXECUTABLE}: ${arms_hipify_error}\n"
    "Either install torch into that Python and let the build see it:\n"
    "  pip install torch && pip install --no-build-isolation .\n"
    "or build without the HIP backend:\n"
    "  pip install . -Ccmake.define.ALLREDUCE_RMS_HIP=OFF")
endif()

# Build-time hipify: cpp/ -> ${arms_hipified_dir}, every backend file of cpp/ except
# platform_cuda.h (the CUDA spelling of the platform layer; hip/platform_hip.h replaces it).
set(arms_hipify_script "${CMAKE_CURRENT_LIST_DIR}/hipify_tree.py")
set(arms_hipified_dir "${CMAKE_CURRENT_BINARY_DIR}/hipified")
set(arms_hipify_stamp "${CMAKE_CURRENT_BINARY_DIR}/hipified.stamp")
file(GLOB arms_cpp_files CONFIGURE_DEPENDS "${ARMS_CPP_DIR}/*")
file(GLOB arms_cpp_headers CONFIGURE_DEPENDS "${ARMS_CPP_DIR}/*.h" "${ARMS_CPP_DIR}/*.cuh")
list(FILTER arms_cpp_headers EXCLUDE REGEX "/platform_cuda\\.h$")
list(TRANSFORM arms_cpp_headers REPLACE "^.*/" "${arms_hipified_dir}/" OUTPUT_VARIABLE arms_hipified_headers)
list(TRANSFORM ARMS_BACKEND_SOURCES REPLACE "\\.cu$" ".hip" OUTPUT_VARIABLE arms_hip_sources)
list(TRANSFORM arms_hip_sources PREPEND "${arms_hipified_dir}/")

add_custom_command(
  OUTPUT "${arms_hipify_stamp}"
  BYPRODUCTS ${arms_hip_sources} ${arms_hipified_headers}
  COMMAND "${Python_EXECUTABLE}" "${arms_hipify_script}" --source "${ARMS_CPP_DIR}" --output "${arms_hipified_dir}"
          --stamp "${arms_hipify_stamp}" --exclude platform_cuda.h
  DEPENDS ${arms_cpp_files} "${arms_hipify_script}"
  COMMENT "Hipifying cpp/ into ${arms_hipified_dir}"
  VERBATIM)

add_library(arms_hip SHARED ${arms_hip_sources} "${arms_hipify_stamp}")
set_source_files_properties(${arms_hip_sources} PROPERTIES LANGUAGE HIP GENERATED ON)
# hip/ before the hipified tree: platform.h's #include "platform_hip.h" must find hip/platform_hip.h.
target_include_directories(arms_hip PRIVATE "${ARMS_HIP_DIR}" "${arms_hipified_dir}")
target_compile_features(arms_hip PRIVATE cxx_std_17 hip_std_17)
# No -ffast-math: its finite-math part lets clang assume no NaN, and a timed-out exchange poisons
# its rows with NaN on purpose (nvcc's --use_fast_math, used for CUDA, has no such part).
target_compile_options(arms_hip PRIVATE $<$<COMPILE_LANGUAGE:HIP>:-O3>)
target_compile_definitions(arms_hip PRIVATE ARMS_TRACE_ALL_BLOCKS=$<BOOL:${ALLREDUCE_RMS_TRACE_ALL_BLOCKS}>)
set_target_properties(arms_hip PROPERTIES
  OUTPUT_NAME arms_hip
  HIP_ARCHITECTURES "${ALLREDUCE_RMS_HIP_ARCHS}"
  HIP_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON)
arms_export_only_backend_api(arms_hip)
install(TARGETS arms_hip LIBRARY DESTINATION allreduce_rms)

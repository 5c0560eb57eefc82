# Build options, all settable from pip:  pip install . -Ccmake.define.ALLREDUCE_RMS_CUDA=OFF
#   ALLREDUCE_RMS_CUDA        AUTO (build if nvcc is found) | ON (required) | OFF
#   ALLREDUCE_RMS_HIP         AUTO (build if ROCm/hipcc is found) | ON (required) | OFF
#   ALLREDUCE_RMS_CUDA_ARCHS  CMake CUDA_ARCHITECTURES list; default 80;90a, plus 100 when nvcc >= 12.8
#   ALLREDUCE_RMS_HIP_ARCHS   offload targets; default gfx90a;gfx942;gfx950 (ROCm >= 6), gfx90a;gfx940 before
#   ALLREDUCE_RMS_TRACE_ALL_BLOCKS  OFF | ON: a trace build, whose every block stamps the profiler's
#                             trace (the latest first row and last store of the grid; see backend_api.h)
set(ALLREDUCE_RMS_CUDA "AUTO" CACHE STRING "Build the CUDA backend: AUTO, ON or OFF")
set(ALLREDUCE_RMS_HIP "AUTO" CACHE STRING "Build the HIP backend: AUTO, ON or OFF")
set_property(CACHE ALLREDUCE_RMS_CUDA PROPERTY STRINGS AUTO ON OFF)
set_property(CACHE ALLREDUCE_RMS_HIP PROPERTY STRINGS AUTO ON OFF)
set(ALLREDUCE_RMS_CUDA_ARCHS "" CACHE STRING "CUDA architectures (empty: the default list)")
set(ALLREDUCE_RMS_HIP_ARCHS "" CACHE STRING "HIP offload architectures (empty: the default list)")
option(ALLREDUCE_RMS_TRACE_ALL_BLOCKS "Trace build: every block stamps the profiler's trace" OFF)

foreach(option ALLREDUCE_RMS_CUDA ALLREDUCE_RMS_HIP)
  string(TOUPPER "${${option}}" value)
  if(value STREQUAL "TRUE" OR value STREQUAL "1" OR value STREQUAL "YES")
    set(value ON)
  elseif(value STREQUAL "FALSE" OR value STREQUAL "0" OR value STREQUAL "NO")
    set(value OFF)
  endif()
  if(NOT value MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "${option} must be AUTO, ON or OFF (got '${${option}}')")
  endif()
  set(${option} "${value}")
endforeach()

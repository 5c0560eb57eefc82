# libarms_cuda.so: cpp/ compiled by nvcc, static cudart, one exported symbol (arms_backend_api).
enable_language(CUDA)

if(ALLREDUCE_RMS_CUDA_ARCHS STREQUAL "")
  set(ALLREDUCE_RMS_CUDA_ARCHS 80 90a)
  if(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
    list(APPEND ALLREDUCE_RMS_CUDA_ARCHS 100)
  endif()
endif()
message(STATUS "allreduce_rms: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${ALLREDUCE_RMS_CUDA_ARCHS}")

list(TRANSFORM ARMS_BACKEND_SOURCES PREPEND "${ARMS_CPP_DIR}/" OUTPUT_VARIABLE arms_cuda_sources)
add_library(arms_cuda SHARED ${arms_cuda_sources})
target_include_directories(arms_cuda PRIVATE "${ARMS_CPP_DIR}")
target_compile_features(arms_cuda PRIVATE cxx_std_17 cuda_std_17)
target_compile_options(arms_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 --use_fast_math>)
target_compile_definitions(arms_cuda PRIVATE ARMS_TRACE_ALL_BLOCKS=$<BOOL:${ALLREDUCE_RMS_TRACE_ALL_BLOCKS}>)
set_target_properties(arms_cuda PROPERTIES
  CUDA_ARCHITECTURES "${ALLREDUCE_RMS_CUDA_ARCHS}"
  CUDA_RUNTIME_LIBRARY Static
  CUDA_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON)
arms_export_only_backend_api(arms_cuda)
install(TARGETS arms_cuda LIBRARY DESTINATION allreduce_rms)

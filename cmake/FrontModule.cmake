# The nanobind front module: host C++ only. It links neither libtorch nor a GPU runtime, so it
# builds and imports on any machine; backends are dlopen()ed from beside it at run time.
find_package(Python 3.9 REQUIRED COMPONENTS Interpreter Development.Module ${SKBUILD_SABI_COMPONENT})
execute_process(COMMAND "${Python_EXECUTABLE}" -m nanobind --cmake_dir
                OUTPUT_STRIP_TRAILING_WHITESPACE OUTPUT_VARIABLE nanobind_ROOT)
find_package(nanobind CONFIG REQUIRED)

nanobind_add_module(_front STABLE_ABI NB_STATIC "${ARMS_CPP_DIR}/module.cpp" "${ARMS_CPP_DIR}/hot_ops.cpp"
                    "${ARMS_CPP_DIR}/torch_abi.cpp")
target_include_directories(_front PRIVATE "${ARMS_CPP_DIR}")
target_compile_features(_front PRIVATE cxx_std_17)
find_package(Threads REQUIRED)  # pthread_atfork (hot_ops.cpp); in libc only from glibc 2.34
target_link_libraries(_front PRIVATE ${CMAKE_DL_LIBS} Threads::Threads)
install(TARGETS _front LIBRARY DESTINATION allreduce_rms)

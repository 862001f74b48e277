# CUDA module _C_cuda, included by CMakeLists.txt when check_language(CUDA) found nvcc.
# The CUDA runtime is linked statically and its symbols kept private, so importing hardneg needs
# no libcudart on the machine (only a driver when a kernel runs), and the copy torch loads is never
# interposed. Like _C, it links no libtorch.
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

pybind11_add_module(_C_cuda MODULE csrc/bindings/hardneg_cuda.cpp csrc/cuda/hardneg_loss.cu)
target_include_directories(_C_cuda PRIVATE csrc/include)
# CUDA_RUNTIME_LIBRARY None: the runtime comes from the explicit CUDA::cudart_static below only.
set_target_properties(_C_cuda PROPERTIES CUDA_RUNTIME_LIBRARY None CUDA_VISIBILITY_PRESET hidden)
target_link_libraries(_C_cuda PRIVATE CUDA::cudart_static)
target_link_options(_C_cuda PRIVATE "LINKER:--exclude-libs,ALL")
# Accurate expf/logf (no --use_fast_math): the loss is compared with an fp64 reference at 1e-5.
target_compile_options(_C_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3>)
install(TARGETS _C_cuda LIBRARY DESTINATION hardneg)

# ---- NCCL ring communicator (csrc/cuda/nccl_comm.cpp) -------------------------------------------
# Built into _C_cuda whenever nccl.h is found: NCCL_ROOT (CMake or environment variable), the
# nvidia-nccl-cu12/-cu13 wheel of the target Python environment (site-packages/nvidia/nccl), or
# the system. Only the header is used at build time: libnccl.so.2 is opened at run time by its
# soname (dlopen), so the copy torch already loaded is reused and NCCL is never linked or vendored.
# HARDNEG_NCCL=OFF skips it; HARDNEG_NCCL=ON fails when nccl.h is missing.
set(HARDNEG_NCCL "AUTO" CACHE STRING "Build the NCCL ring communicator: AUTO, ON or OFF")
set_property(CACHE HARDNEG_NCCL PROPERTY STRINGS AUTO ON OFF)
if(NOT HARDNEG_NCCL STREQUAL "OFF")
  # Every site-packages of the target interpreter (a venv's and, with system site packages, the
  # base one's): pip's build isolation hides them from sys.path but not from site.
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import site; print(';'.join(site.getsitepackages()))"
    OUTPUT_VARIABLE _hardneg_site_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  set(_hardneg_nccl_hints ${NCCL_ROOT} $ENV{NCCL_ROOT} ${Python_SITEARCH}/nvidia/nccl)
  foreach(_dir IN LISTS _hardneg_site_dirs)
    list(APPEND _hardneg_nccl_hints ${_dir}/nvidia/nccl)
  endforeach()
  find_path(HARDNEG_NCCL_INCLUDE_DIR nccl.h
            HINTS ${_hardneg_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS}/..
            PATH_SUFFIXES include)
  if(HARDNEG_NCCL_INCLUDE_DIR)
    set(HARDNEG_HAVE_NCCL ON)
    message(STATUS "hardneg: NCCL ring communicator from ${HARDNEG_NCCL_INCLUDE_DIR}/nccl.h")
    target_sources(_C_cuda PRIVATE csrc/cuda/nccl_comm.cpp)
    target_include_directories(_C_cuda PRIVATE ${HARDNEG_NCCL_INCLUDE_DIR})
    target_compile_definitions(_C_cuda PRIVATE HARDNEG_HAVE_NCCL=1)
    target_link_libraries(_C_cuda PRIVATE ${CMAKE_DL_LIBS})
  elseif(HARDNEG_NCCL STREQUAL "ON")
    message(FATAL_ERROR "HARDNEG_NCCL=ON but nccl.h was not found (set NCCL_ROOT or install "
                        "nvidia-nccl-cu12/-cu13 into the target environment)")
  else()
    message(STATUS "hardneg: nccl.h not found, building without the NCCL ring communicator")
  endif()
endif()

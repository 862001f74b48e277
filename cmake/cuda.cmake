# CUDA module _C_cuda, included by CMakeLists.txt when check_language(CUDA) found nvcc.
#
# Driver compatibility (the module must run wherever the user's torch's CUDA runs, torch's CUDA 12
# wheels on r525+ drivers included): the module links no CUDA runtime. Its host code calls the
# driver API through a table resolved from libcuda.so.1 at run time (csrc/cuda/cuda_driver.h), and
# the kernels are embedded images loaded with cuModuleLoadData (csrc/cuda/kernel_image.h):
# - PTX per architecture, compiled by nvcc and lowered to the oldest PTX ISA that knows the target
#   (7.0 for sm_80, 7.8 for sm_90: CUDA 11.0 / 11.8 drivers), the JIT fallback of any driver;
# - a cubin per architecture, assembled from that PTX by the oldest ptxas found: the
#   nvidia-cuda-nvcc-cu12 wheel's (CUDA 12 cubins load on r525+ drivers) when it is installed in
#   the target environment, else the toolkit's (CUDA 13 cubins use a newer ELF ABI and need r580+;
#   older drivers then JIT the PTX). HARDNEG_PTXAS names another ptxas.
# build_info() reports the resulting minimum driver (cuda_driver_min: PTX; cuda_driver_min_sass:
# the cubins). Like _C, it links no libtorch; it links nothing CUDA at all.
find_package(CUDAToolkit REQUIRED)

# Every site-packages of the target interpreter (a venv's and, with system site packages, the base
# one's): pip's build isolation hides them from sys.path but not from site.
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import site; print(';'.join(site.getsitepackages()))"
  OUTPUT_VARIABLE _hardneg_site_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)

# ---- kernel images ------------------------------------------------------------------------------
function(_hardneg_tool_release tool out)
  execute_process(COMMAND ${tool} --version OUTPUT_VARIABLE _text ERROR_QUIET)
  string(REGEX MATCH "release ([0-9]+\\.[0-9]+)" _match "${_text}")
  set(${out} "${CMAKE_MATCH_1}" PARENT_SCOPE)
endfunction()

set(HARDNEG_PTXAS "" CACHE FILEPATH "ptxas for the cubins (default: the oldest of the CUDA 12 wheel's and the toolkit's)")
set(_hardneg_ptxas "${HARDNEG_PTXAS}")
if(NOT _hardneg_ptxas)
  set(_hardneg_ptxas "${CUDAToolkit_BIN_DIR}/ptxas")
  foreach(_dir IN LISTS _hardneg_site_dirs)
    if(EXISTS "${_dir}/nvidia/cuda_nvcc/bin/ptxas")
      _hardneg_tool_release("${_dir}/nvidia/cuda_nvcc/bin/ptxas" _wheel_release)
      _hardneg_tool_release("${_hardneg_ptxas}" _toolkit_release)
      if(_wheel_release AND _wheel_release VERSION_LESS _toolkit_release)
        set(_hardneg_ptxas "${_dir}/nvidia/cuda_nvcc/bin/ptxas")
      endif()
    endif()
  endforeach()
endif()
_hardneg_tool_release("${_hardneg_ptxas}" HARDNEG_PTXAS_RELEASE)
if(NOT HARDNEG_PTXAS_RELEASE)
  message(FATAL_ERROR "hardneg: ${_hardneg_ptxas} --version does not name a CUDA release")
endif()
string(REGEX MATCH "^[0-9]+" _ptxas_major "${HARDNEG_PTXAS_RELEASE}")
# Minor version compatibility: a cubin of any CUDA 12.x ptxas loads on every CUDA 12.0+ driver.
set(HARDNEG_CUDA_DRIVER_MIN_SASS "${_ptxas_major}.0")
message(STATUS "hardneg: cubins by ${_hardneg_ptxas} (CUDA ${HARDNEG_PTXAS_RELEASE}, "
               "driver >= CUDA ${HARDNEG_CUDA_DRIVER_MIN_SASS})")

# The oldest PTX ISA that knows each target, and the CUDA driver that JIT-compiles it.
set(_hardneg_isa_80 7.0)
set(_hardneg_isa_86 7.1)
set(_hardneg_isa_87 7.4)
set(_hardneg_isa_89 7.8)
set(_hardneg_isa_90 7.8)
set(_hardneg_isa_100 8.6)
set(_hardneg_isa_120 8.7)
set(HARDNEG_CUDA_DRIVER_MIN "11.0")
set(HARDNEG_PTX_ISA "")
set(_hardneg_images "")
set(_hardneg_image_files "")
set(_kdir "${CMAKE_CURRENT_BINARY_DIR}/kernels")
file(MAKE_DIRECTORY "${_kdir}")
set(_ksrc "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/hardneg_loss_kernels.cu")
file(GLOB _kdeps "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cuh" "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/hardneg_loss_kernels.h"
     "${CMAKE_CURRENT_SOURCE_DIR}/csrc/include/hardneg/*.h")
foreach(_arch IN LISTS CMAKE_CUDA_ARCHITECTURES)
  string(REGEX REPLACE "-(real|virtual)$" "" _sm "${_arch}")
  if(NOT _sm MATCHES "^[0-9]+$" OR NOT DEFINED _hardneg_isa_${_sm})
    message(FATAL_ERROR "hardneg: CMAKE_CUDA_ARCHITECTURES entry '${_arch}' is not one of 80, 86, "
                        "87, 89, 90, 100, 120")
  endif()
  set(_isa ${_hardneg_isa_${_sm}})
  string(REGEX MATCH "^([0-9]+)\\.([0-9]+)$" _m "${_isa}")
  math(EXPR _cuda_major "${CMAKE_MATCH_1} + 4")  # ISA 7.x: CUDA 11.x, 8.x: CUDA 12.x
  set(_driver "${_cuda_major}.${CMAKE_MATCH_2}")
  if(_isa VERSION_GREATER_EQUAL 8.6)
    math(EXPR _minor "${CMAKE_MATCH_2} + 1")  # ISA 8.6: CUDA 12.7, 8.7: 12.8
    set(_driver "12.${_minor}")
  endif()
  if(_driver VERSION_GREATER HARDNEG_CUDA_DRIVER_MIN)
    set(HARDNEG_CUDA_DRIVER_MIN "${_driver}")
  endif()
  list(APPEND HARDNEG_PTX_ISA "${_sm}:${_isa}")
  add_custom_command(
    OUTPUT "${_kdir}/compute_${_sm}.ptx" "${_kdir}/sm_${_sm}.cubin"
    COMMAND ${CUDAToolkit_NVCC_EXECUTABLE} -std=c++17 -O3 -ptx -arch=compute_${_sm}
            -I${CMAKE_CURRENT_SOURCE_DIR}/csrc/include ${_ksrc} -o "${_kdir}/compute_${_sm}.nvcc.ptx"
    COMMAND ${CMAKE_COMMAND} -DIN=${_kdir}/compute_${_sm}.nvcc.ptx -DOUT=${_kdir}/compute_${_sm}.ptx
            -DISA=${_isa} -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/lower_ptx.cmake
    COMMAND ${_hardneg_ptxas} -O3 -arch=sm_${_sm} "${_kdir}/compute_${_sm}.ptx" -o "${_kdir}/sm_${_sm}.cubin"
    DEPENDS ${_ksrc} ${_kdeps} ${CMAKE_CURRENT_SOURCE_DIR}/cmake/lower_ptx.cmake
    COMMENT "hardneg kernels for sm_${_sm} (PTX ISA ${_isa})"
    VERBATIM)
  list(APPEND _hardneg_image_files "${_kdir}/compute_${_sm}.ptx" "${_kdir}/sm_${_sm}.cubin")
  string(APPEND _hardneg_images
         "HARDNEG_IMAGE(sm_${_sm}_cubin, \"sm_${_sm} cubin\", ${_sm}, false, \"${_kdir}/sm_${_sm}.cubin\")\n"
         "HARDNEG_IMAGE(compute_${_sm}_ptx, \"compute_${_sm} PTX\", ${_sm}, true, \"${_kdir}/compute_${_sm}.ptx\")\n")
endforeach()
string(REPLACE ";" "," HARDNEG_PTX_ISA "${HARDNEG_PTX_ISA}")
configure_file(${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/kernel_image_data.cpp.in
               ${CMAKE_CURRENT_BINARY_DIR}/kernel_image_data.cpp @ONLY)
set_source_files_properties(${CMAKE_CURRENT_BINARY_DIR}/kernel_image_data.cpp PROPERTIES
                            OBJECT_DEPENDS "${_hardneg_image_files}")
add_custom_target(hardneg_kernel_images DEPENDS ${_hardneg_image_files})

# ---- the module ---------------------------------------------------------------------------------
pybind11_add_module(_C_cuda MODULE
  csrc/bindings/hardneg_cuda.cpp
  csrc/cuda/hardneg_loss.cpp
  csrc/cuda/cuda_driver.cpp
  csrc/cuda/cuda_driver_load.cpp
  csrc/cuda/kernel_image.cpp
  ${CMAKE_CURRENT_BINARY_DIR}/kernel_image_data.cpp)
add_dependencies(_C_cuda hardneg_kernel_images)
target_include_directories(_C_cuda PRIVATE csrc/include csrc/cuda)
# cuda.h for the driver API's types and signatures only: nothing CUDA is linked.
target_include_directories(_C_cuda SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
target_link_libraries(_C_cuda PRIVATE ${CMAKE_DL_LIBS})
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
    target_sources(_C_cuda PRIVATE csrc/cuda/nccl_comm.cpp csrc/cuda/nccl_load.cpp)
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

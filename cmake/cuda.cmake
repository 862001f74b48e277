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

# The CUDA backend (MOCA_WITH_CUDA=ON):
#   moca_cuda_kernels  the kernels of include/moca/backend/cuda/kernels, compiled once by nvcc
#                      for float and double (src/cuda/kernels.cu);
#   moca::cuda         what a program links: moca::moca, the kernels, cudart, cuBLAS and cuBLASLt, and
#                      MOCA_WITH_CUDA=1. Its own sources stay ordinary C++.

# Compile for the card at hand by default: sm_90 is the H100 and H200. Another card needs
# -DCMAKE_CUDA_ARCHITECTURES=<its sm>. Set before enable_language(CUDA), which would otherwise pick
# nvcc's oldest supported architecture.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "GPU architectures the CUDA kernels are built for")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
# One CUDA runtime per program: the shared one, which moca::cuda links as CUDA::cudart. Without
# this, programs here that link the kernels library would also get CMake's default, the static
# runtime, and two runtimes do not share state (streams, errors, the current device).
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)

add_library(moca_cuda_kernels STATIC ${PROJECT_SOURCE_DIR}/src/cuda/kernels.cu)
target_include_directories(moca_cuda_kernels PRIVATE ${PROJECT_SOURCE_DIR}/include)
target_link_libraries(moca_cuda_kernels PUBLIC CUDA::cudart CUDA::cublas CUDA::cublasLt)
set_target_properties(moca_cuda_kernels PROPERTIES
  POSITION_INDEPENDENT_CODE ON  # the library may end up inside a shared object
  EXPORT_NAME cuda_kernels)
# The kernels include the C++20 core headers. Older CMake (3.25, for one) knows no C++20 flag for
# nvcc; there, pass it directly (nvcc has accepted it since CUDA 12).
if(CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
  set_target_properties(moca_cuda_kernels PROPERTIES CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON)
else()
  set_property(TARGET moca_cuda_kernels PROPERTY CUDA_STANDARD)  # no second -std flag
  target_compile_options(moca_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
endif()
# A host function called from a kernel is an error, not a warning that leaves a broken kernel.
target_compile_options(moca_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--Werror=cross-execution-space-call -Xcompiler=-Wall,-Wextra>)

add_library(moca_cuda INTERFACE)
add_library(moca::cuda ALIAS moca_cuda)
target_link_libraries(moca_cuda INTERFACE moca::moca moca_cuda_kernels CUDA::cudart CUDA::cublas CUDA::cublasLt)
target_compile_definitions(moca_cuda INTERFACE MOCA_WITH_CUDA=1)
set_target_properties(moca_cuda PROPERTIES EXPORT_NAME cuda)

# Installed and exported next to moca::moca by MocaInstall.cmake.
set(MOCA_CUDA_EXPORT_TARGETS moca_cuda_kernels moca_cuda)

# CUDA kernels of the backend's ops other than the selective scan (that one is cuda.cmake's), one
# .cu per op family beside its CPU reference. Host-side launchers take raw pointers and a stream,
# so the .cu files never see the C++20 worker headers.
add_library(mamba_kernels_cuda_ops STATIC
  ${CMAKE_CURRENT_LIST_DIR}/adamw.cu
  ${CMAKE_CURRENT_LIST_DIR}/conv1d.cu
  ${CMAKE_CURRENT_LIST_DIR}/convert.cu
  ${CMAKE_CURRENT_LIST_DIR}/cross_entropy.cu
  ${CMAKE_CURRENT_LIST_DIR}/elementwise.cu
  ${CMAKE_CURRENT_LIST_DIR}/embedding.cu
  ${CMAKE_CURRENT_LIST_DIR}/linear.cu
  ${CMAKE_CURRENT_LIST_DIR}/rmsnorm.cu
  ${CMAKE_CURRENT_LIST_DIR}/silu.cu
)
target_include_directories(mamba_kernels_cuda_ops PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(mamba_kernels_cuda_ops PUBLIC CUDA::cudart_static CUDA::cublas)
set_target_properties(mamba_kernels_cuda_ops PROPERTIES
  CUDA_ARCHITECTURES 90
  # C++17 suffices for the device code, and CMake < 3.26 cannot ask nvcc 13 for CUDA20.
  CUDA_STANDARD 17)
target_compile_options(mamba_kernels_cuda_ops PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)

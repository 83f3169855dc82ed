# CUDA selective scan, compiled once (object library) into a static library for in-process
# callers (tests, bench, the worker) and the shared libmamba_kernels.so, which exports only the
# C ABI of mamba_kernels.h (everything else is hidden) for ctypes users.
add_library(mamba_kernels_cuda_obj OBJECT
  ${CMAKE_CURRENT_LIST_DIR}/selective_scan_cuda.cu
  ${CMAKE_CURRENT_LIST_DIR}/selective_scan_fwd.cu
  ${CMAKE_CURRENT_LIST_DIR}/selective_scan_bwd.cu
  ${CMAKE_CURRENT_LIST_DIR}/selective_scan_state.cu
  ${CMAKE_CURRENT_LIST_DIR}/selective_scan_tiled.cu
  ${CMAKE_CURRENT_LIST_DIR}/mamba_kernels_capi.cc
)
target_include_directories(mamba_kernels_cuda_obj PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(mamba_kernels_cuda_obj PUBLIC CUDA::cudart_static)
set_target_properties(mamba_kernels_cuda_obj PROPERTIES
  CUDA_ARCHITECTURES 90 POSITION_INDEPENDENT_CODE ON
  # C++17 suffices for the device code, and CMake < 3.26 cannot ask nvcc 13 for CUDA20.
  CUDA_STANDARD 17
  CXX_VISIBILITY_PRESET hidden CUDA_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
target_compile_options(mamba_kernels_cuda_obj PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo -Xptxas=-warn-spills>)

add_library(mamba_kernels_cuda STATIC $<TARGET_OBJECTS:mamba_kernels_cuda_obj>)
target_include_directories(mamba_kernels_cuda PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(mamba_kernels_cuda PUBLIC CUDA::cudart_static)

add_library(mamba_kernels SHARED $<TARGET_OBJECTS:mamba_kernels_cuda_obj>)
target_link_libraries(mamba_kernels PRIVATE CUDA::cudart_static)

# GPU tests of the CUDA kernels. They build wherever nvcc is found and skip (GTEST_SKIP, with a
# message) on machines without a GPU, so the suite passes there too.
mamba_test(test_selective_scan_cuda
  SOURCES gpu/test_selective_scan_cuda.cc
  LIBS mamba_kernels_cuda mamba_kernels_cpu CUDA::cudart)

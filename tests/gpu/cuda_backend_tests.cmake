# The CUDA backend's ops against the CPU backend. Builds wherever nvcc is found (also in
# kernels-only mode) and skips, with a message, on machines without a GPU.
mamba_test(test_cuda_backend SOURCES gpu/test_cuda_backend.cc LIBS mamba_backend)
# The mixed-precision ops (bf16 GEMM operands and outputs, conversions, AdamW's bf16 shadow).
mamba_test(test_cuda_mixed_precision SOURCES gpu/test_cuda_mixed_precision.cc LIBS mamba_backend)
# The same ops on bfloat16 activations (and the deferred cross-entropy statistics).
mamba_test(test_cuda_backend_bf16 SOURCES gpu/test_cuda_backend_bf16.cc LIBS mamba_backend)
# Hardware counters (CUPTI) of the backend's ops: DRAM bytes of a conversion against its size.
mamba_test(test_cuda_counters SOURCES gpu/test_cuda_counters.cc LIBS mamba_backend)

# The model and training loop on the CUDA backend against the CPU backend (needs the full build:
# job specs, datasets, trainer). Skips, with a message, on machines without a GPU.
mamba_test(test_cuda_model SOURCES gpu/test_cuda_model.cc LIBS mamba_worker)

// The GPU launchers (csrc/cuda/*.cu), compiled for the CPU SIMT emulator: the same files nvcc builds for
// CUDA, so the test ops in this directory launch exactly what a GPU runs.
#include "cuda/kd_loss.cu"
#include "cuda/kd_topk.cu"
#include "cuda/int8.cu"
#include "cuda/sparse24.cu"

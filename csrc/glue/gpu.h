// What the GPU glue of every family needs from the device it drives: the stream, a check after each launch,
// and the few choices that differ between a real GPU and the SIMT emulator's test ops. The kernels and their
// launchers are the same for both (include/fastdistill/*.cuh, cuda/*.cu).
#pragma once
#include "fastdistill/common.h"

namespace fastdistill {

struct GpuBackend {
  GpuStream stream = nullptr;
  void (*check_launch)() = nullptr;  // CUDA: raise the launch error, if any
  int multiprocessors = 8;           // the emulator's stand-in for a GPU's SM count
  int max_blocks = 4096;             // grid-stride kernels (epilogue, decompression)
  // Above 16 rows: the vendor GEMM (int8: torch._int_mm + our epilogue; 2:4: decompress + cuBLAS) instead of
  // our GEMV tiles. The emulator's tests turn it off to run the GEMV kernels at every M.
  bool vendor_gemm = true;
  int kd_threads = 0, kd_splits = 0;  // 0: the launch rule's choice (tests force values)

  void launched() const {
    if (check_launch) check_launch();
  }
};

}  // namespace fastdistill

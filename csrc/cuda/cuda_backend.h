// The GpuBackend of the current CUDA device and stream, for the registration files of this directory.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "glue/gpu.h"

namespace fastdistill {

inline GpuBackend cuda_backend() {
  static int sms[64] = {};  // multiprocessors per device, read once
  int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) dev = 0;
  if (sms[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev));
  GpuBackend b;
  b.stream = c10::cuda::getCurrentCUDAStream().stream();
  b.check_launch = [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); };
  b.multiprocessors = sms[dev];
  return b;
}

}  // namespace fastdistill

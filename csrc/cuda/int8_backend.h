// The int8 kernel launches on the current CUDA stream, as the backend that cuda/int8_glue.h drives.
// The 2:4 CUDA ops reuse it for their int8 values (quantisation, GEMV, epilogue).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/int8_launch.h"

namespace fastdistill {

struct Int8CudaBackend {
  bool int_mm = true;
  cudaStream_t s = c10::cuda::getCurrentCUDAStream().stream();
  void quantize(DType t, const int8::QuantParams& p) {
    int8::quantize_rows_cuda(t, p, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void gemv(const int8::GemvParams& p, bool weight_only) {
    int8::gemv_cuda(p, weight_only, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void to_f32(DType t, const void* x, int64_t rows, int64_t ldx, int64_t k, int64_t kp, float* out) {
    int8::to_f32_padded_cuda(t, x, rows, ldx, k, kp, out, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void epilogue(const int32_t* acc, int64_t m, int64_t n, const float* xs, const float* ws, const float* bias,
                void* out, int8::OutKind kind) {
    int8::epilogue_cuda(acc, m, n, xs, ws, bias, out, kind, 4096, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace fastdistill

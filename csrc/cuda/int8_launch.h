// Host entry points of the CUDA int8 kernels (int8.cu), callable from the torch glue.
#pragma once
#include <cuda_runtime_api.h>

#include "fastdistill/int8_params.h"

namespace fastdistill::int8 {

void quantize_rows_cuda(DType t, const QuantParams& p, cudaStream_t stream);
void gemv_cuda(const GemvParams& p, bool weight_only, cudaStream_t stream);
void to_f32_padded_cuda(DType t, const void* x, int64_t rows, int64_t ldx, int64_t k, int64_t k_pad, float* out,
                        cudaStream_t stream);
void epilogue_cuda(const int32_t* acc, int64_t m, int64_t n, const float* x_scales, const float* w_scales,
                   const float* bias, void* out, OutKind kind, int max_blocks, cudaStream_t stream);

}  // namespace fastdistill::int8

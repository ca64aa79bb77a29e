// Host entry points of the CUDA 2:4 kernels (sparse24.cu), callable from the torch glue.
#pragma once
#include <cuda_runtime_api.h>

#include "fastdistill/sparse24_params.h"

namespace fastdistill::sparse24 {

void gemv_cuda(ValKind vk, const Sparse24Params& p, bool vec, cudaStream_t stream);
void decompress_cuda(ValKind vk, const void* values, const uint8_t* meta, int64_t n, int64_t k, void* dense,
                     int max_blocks, cudaStream_t stream);

}  // namespace fastdistill::sparse24

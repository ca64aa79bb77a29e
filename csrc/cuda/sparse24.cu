// 2:4 sparse GEMV (fp32 / bf16 / fp16 / int8 values, canonical layout) and decompression on CUDA.
// Kernels: fastdistill/sparse24.cuh (torch-free).
#include "cuda/sparse24_launch.h"
#include "fastdistill/sparse24.cuh"

namespace fastdistill::sparse24 {

void gemv_cuda(ValKind vk, const Sparse24Params& p, bool vec, cudaStream_t stream) {
  sparse24_gemv_launch(vk, p, vec, stream);
}
void decompress_cuda(ValKind vk, const void* values, const uint8_t* meta, int64_t n, int64_t k, void* dense,
                     int max_blocks, cudaStream_t stream) {
  sparse24_decompress_launch(vk, values, meta, n, k, dense, max_blocks, stream);
}

}  // namespace fastdistill::sparse24

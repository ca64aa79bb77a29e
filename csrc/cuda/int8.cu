// int8 inference on CUDA: per-token quantisation, the dp4a W8A8 GEMV and the weight-only GEMV for small
// M, the dequant + bias epilogue after torch._int_mm. Kernels: fastdistill/int8.cuh (torch-free).
#include "cuda/int8_launch.h"
#include "fastdistill/int8.cuh"

namespace fastdistill::int8 {

void quantize_rows_cuda(DType t, const QuantParams& p, cudaStream_t stream) { quantize_rows_launch(t, p, stream); }
void gemv_cuda(const GemvParams& p, bool weight_only, cudaStream_t stream) { int8_gemv_launch(p, weight_only, stream); }
void to_f32_padded_cuda(DType t, const void* x, int64_t rows, int64_t ldx, int64_t k, int64_t k_pad, float* out,
                        cudaStream_t stream) {
  to_f32_padded_launch(t, x, rows, ldx, k, k_pad, out, stream);
}
void epilogue_cuda(const int32_t* acc, int64_t m, int64_t n, const float* x_scales, const float* w_scales,
                   const float* bias, void* out, OutKind kind, int max_blocks, cudaStream_t stream) {
  int8_epilogue_launch(acc, m, n, x_scales, w_scales, bias, out, kind, max_blocks, stream);
}

}  // namespace fastdistill::int8

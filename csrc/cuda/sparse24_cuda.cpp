// CUDA registration of the 2:4 ops (schemas: csrc/ops.cpp; glue: glue/sparse24.h). Up to 16 rows our GEMV reads
// the canonical values + meta; above, decompress + cuBLAS (float values) or torch._int_mm + our epilogue (int8).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_backend.h"
#include "glue/sparse24.h"

namespace fastdistill::sparse24 {
namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard g(x.device());
  return linear_gpu(cuda_backend(), x, values, meta, std::nullopt, bias);
}
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                       const at::Tensor& w_scales, const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard g(x.device());
  return linear_gpu(cuda_backend(), x, values, meta, w_scales, bias);
}
std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& v, const at::Tensor& m) {
  c10::cuda::CUDAGuard g(v.device());
  return pack(v, m);
}

}  // namespace
}  // namespace fastdistill::sparse24

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  using namespace fastdistill::sparse24;
  m.impl("sparse24_pack", &pack_cuda);
  m.impl("sparse24_linear", &linear);
  m.impl("sparse24_int8_linear", &int8_linear);
}

// CUDA registration of the int8 ops (schemas: csrc/ops.cpp; glue: glue/int8.h). Up to 16 rows our dp4a GEMV
// tiles; above, torch._int_mm (cuBLASLt) and our fused dequant + bias epilogue. Weight-only: our GEMV up to 16
// rows, dequantise + cuBLAS beyond.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_backend.h"
#include "glue/int8.h"

namespace fastdistill::int8 {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  c10::cuda::CUDAGuard g(x.device());
  return quantize_per_token_gpu(cuda_backend(), x);
}
std::tuple<at::Tensor, at::Tensor> quantize_per_channel(const at::Tensor& w) {
  c10::cuda::CUDAGuard g(w.device());
  return quantize_per_channel_gpu(cuda_backend(), w);
}
at::Tensor pack_weight(const at::Tensor& w) {
  c10::cuda::CUDAGuard g(w.device());
  return pack_weight_gpu(w);
}
at::Tensor unpack_weight(const at::Tensor& w, int64_t n, int64_t k) {
  c10::cuda::CUDAGuard g(w.device());
  return unpack_weight_gpu(w, n, k);
}
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& bias,
                  c10::string_view activation, std::optional<at::ScalarType> out_dtype) {
  c10::cuda::CUDAGuard g(x.device());
  return linear_gpu(cuda_backend(), x, w, s, bias, false, parse_activation("int8_linear", activation), out_dtype);
}
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                              const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard g(x.device());
  return linear_gpu(cuda_backend(), x, w, s, bias, true);
}
at::Tensor gemm_s32(const at::Tensor& x, const at::Tensor& w) {
  c10::cuda::CUDAGuard g(x.device());
  return gemm_s32_gpu(cuda_backend(), x, w);
}

}  // namespace
}  // namespace fastdistill::int8

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  using namespace fastdistill::int8;
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("quantize_per_channel", &quantize_per_channel);
  m.impl("int8_pack_weight", &pack_weight);
  m.impl("int8_unpack_weight", &unpack_weight);
  m.impl("int8_linear", &linear);
  m.impl("int8_weight_only_linear", &weight_only_linear);
  m.impl("int8_gemm_s32", &gemm_s32);
}

// CUDA impls of the int8 ops (schemas in csrc/ops.cpp, issue 3; glue in int8_glue.h, kernels in int8.cu).
// M <= 16 (or shapes cuBLASLt refuses): our dp4a GEMV; M > 16: torch._int_mm + our fused epilogue.
// Weight-only: our GEMV for M <= 16, dequantise + cuBLAS beyond.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/int8_glue.h"
#include "cuda/int8_launch.h"

namespace {

using namespace fastdistill;

struct CudaBackend {
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

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  c10::cuda::CUDAGuard g(x.device());
  CudaBackend b;
  return int8glue::quantize_per_token(b, x);
}
std::tuple<at::Tensor, at::Tensor> quantize_per_channel(const at::Tensor& w) {
  c10::cuda::CUDAGuard g(w.device());
  CudaBackend b;
  return int8glue::quantize_per_channel(b, w);
}
at::Tensor pack_weight(const at::Tensor& w) {
  c10::cuda::CUDAGuard g(w.device());
  return int8glue::pack_weight(w);
}
at::Tensor unpack_weight(const at::Tensor& w, int64_t n, int64_t k) {
  c10::cuda::CUDAGuard g(w.device());
  return int8glue::unpack_weight(w, n, k);
}
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard g(x.device());
  CudaBackend b;
  return int8glue::linear(b, x, w, s, bias, false);
}
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                              const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard g(x.device());
  CudaBackend b;
  return int8glue::linear(b, x, w, s, bias, true);
}
at::Tensor gemm_s32(const at::Tensor& x, const at::Tensor& w) {
  c10::cuda::CUDAGuard g(x.device());
  CudaBackend b;
  return int8glue::gemm_s32(b, x, w);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("quantize_per_channel", &quantize_per_channel);
  m.impl("int8_pack_weight", &pack_weight);
  m.impl("int8_unpack_weight", &unpack_weight);
  m.impl("int8_linear", &linear);
  m.impl("int8_weight_only_linear", &weight_only_linear);
  m.impl("int8_gemm_s32", &gemm_s32);
}

// CUDA impls of the 2:4 ops (schemas in csrc/ops.cpp, issue 4; glue in sparse24_glue.h, kernels in
// sparse24.cu). M <= 16: our GEMV straight from the canonical values + meta; M > 16: decompress +
// cuBLAS (float values) or torch._int_mm + our epilogue (int8 values).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/int8_launch.h"
#include "cuda/sparse24_glue.h"
#include "cuda/sparse24_launch.h"

namespace {

using namespace fastdistill;

struct CudaBackend {
  bool dense_fallback = true;
  bool int_mm = true;
  cudaStream_t s = c10::cuda::getCurrentCUDAStream().stream();
  void gemv(sparse24::ValKind vk, const sparse24::Sparse24Params& p, bool vec) {
    sparse24::gemv_cuda(vk, p, vec, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void decompress(sparse24::ValKind vk, const void* v, const uint8_t* m, int64_t n, int64_t k, void* dense) {
    sparse24::decompress_cuda(vk, v, m, n, k, dense, 4096, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void quantize(DType t, const int8::QuantParams& p) {
    int8::quantize_rows_cuda(t, p, s);
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
  void gemv(const int8::GemvParams& p, bool weight_only) {
    int8::gemv_cuda(p, weight_only, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard g(x.device());
  CudaBackend b;
  return sparse24glue::linear(b, x, values, meta, std::nullopt, bias, false);
}
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                       const at::Tensor& w_scales, const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard g(x.device());
  CudaBackend b;
  return sparse24glue::linear(b, x, values, meta, w_scales, bias, true);
}
std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& v, const at::Tensor& m) {
  c10::cuda::CUDAGuard g(v.device());
  return sparse24glue::pack(v, m);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("sparse24_pack", &pack);
  m.impl("sparse24_linear", &linear);
  m.impl("sparse24_int8_linear", &int8_linear);
}

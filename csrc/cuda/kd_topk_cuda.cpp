// CUDA registration of the top-k teacher loss ops (schemas: csrc/ops.cpp; glue: glue/kd_topk.h).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_backend.h"
#include "glue/kd_topk.h"

namespace fastdistill {
namespace {

std::tuple<at::Tensor, at::Tensor> kd_topk_forward(const at::Tensor& student, const at::Tensor& indices,
                                                    const at::Tensor& logprobs, const std::optional<at::Tensor>& labels,
                                                    double temperature, c10::string_view divergence, double beta,
                                                    int64_t ignore_index, double soft_coef, double hard_weight,
                                                    c10::string_view tail) {
  c10::cuda::CUDAGuard guard(student.device());
  return kd_topk_forward_gpu(cuda_backend(), student, indices, logprobs, labels, temperature, std::string(divergence),
                             beta, ignore_index, soft_coef, hard_weight, std::string(tail));
}

at::Tensor kd_topk_backward(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& indices,
                            const at::Tensor& logprobs, const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                            double temperature, c10::string_view divergence, double beta, int64_t ignore_index,
                            double soft_coef, double hard_weight, c10::string_view tail) {
  c10::cuda::CUDAGuard guard(student.device());
  return kd_topk_backward_gpu(cuda_backend(), grad_rows, student, indices, logprobs, labels, stats, temperature,
                              std::string(divergence), beta, ignore_index, soft_coef, hard_weight, std::string(tail));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("kd_topk_forward", &kd_topk_forward);
  m.impl("kd_topk_backward", &kd_topk_backward);
}

}  // namespace fastdistill

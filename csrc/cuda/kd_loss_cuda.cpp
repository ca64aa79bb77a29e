// CUDA registration of the distillation-loss ops (schemas: csrc/ops.cpp; glue: glue/kd_loss.h).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_backend.h"
#include "glue/kd_loss.h"

namespace fastdistill {
namespace {

std::tuple<at::Tensor, at::Tensor> kd_loss_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    c10::string_view divergence, double beta, int64_t ignore_index,
                                                    double soft_coef, double hard_weight) {
  c10::cuda::CUDAGuard guard(student.device());
  return kd_loss_forward_gpu(cuda_backend(), student, teacher, labels, temperature, std::string(divergence), beta,
                             ignore_index, soft_coef, hard_weight);
}

at::Tensor kd_loss_backward(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature,
                            c10::string_view divergence, double beta, int64_t ignore_index, double soft_coef,
                            double hard_weight) {
  c10::cuda::CUDAGuard guard(student.device());
  return kd_loss_backward_gpu(cuda_backend(), grad_rows, student, teacher, labels, stats, temperature,
                              std::string(divergence), beta, ignore_index, soft_coef, hard_weight);
}

at::Tensor kd_loss_partial(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                           double temperature, c10::string_view divergence, double beta, int64_t ignore_index,
                           double soft_coef, double hard_weight) {
  c10::cuda::CUDAGuard guard(student.device());
  return kd_loss_partial_gpu(cuda_backend(), student, teacher, labels, temperature, std::string(divergence), beta,
                             ignore_index, soft_coef, hard_weight);
}

at::Tensor kd_loss_jsd_sums(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                            double temperature, double beta) {
  c10::cuda::CUDAGuard guard(student.device());
  return kd_loss_jsd_sums_gpu(cuda_backend(), student, teacher, stats, temperature, beta);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("kd_loss_forward", &kd_loss_forward);
  m.impl("kd_loss_backward", &kd_loss_backward);
  m.impl("kd_loss_partial", &kd_loss_partial);
  m.impl("kd_loss_jsd_sums", &kd_loss_jsd_sums);
}

}  // namespace fastdistill

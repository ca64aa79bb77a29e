// CUDA impls of fastdistill::kd_loss_forward / kd_loss_backward (schemas in csrc/ops.cpp): checks,
// allocation and stream/device handling; the kernels are in kd_loss.cu (fastdistill/kd_loss.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kd_loss_glue.h"
#include "cuda/kd_loss_launch.h"

namespace {

using namespace fastdistill;

// Multiprocessors of the current device (cached per device; no cuBLAS/cuSPARSE headers needed).
int sm_count() {
  static int cache[64] = {};
  int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) dev = 0;
  if (cache[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMultiProcessorCount, dev));
  return cache[dev];
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& labels, double temperature,
                                                        std::string_view divergence, double beta,
                                                        int64_t ignore_index, double soft_coef, double hard_weight) {
  c10::cuda::CUDAGuard guard(student.device());
  KdLossArgs a = kd_loss_args(student, teacher, labels, temperature, std::string(divergence), beta, ignore_index,
                            soft_coef, hard_weight);
  auto opts = student.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({a.params.rows}, opts), stats = at::empty({a.params.rows, kNumStats}, opts);
  if (a.params.rows == 0) return {row_loss, stats};
  const auto c = kd::kd_launch_config(a.params.rows, a.params.vocab, kd::kd_vec_for(a.params.student_dtype, a.params.teacher_dtype), 0,
                                      0, sm_count());
  at::Tensor ws = at::empty({kd::kd_forward_workspace_floats(a.params.rows, c.splits)}, opts);
  kd::kd_forward_cuda(a.params, row_loss.data_ptr<float>(), stats.data_ptr<float>(), ws.data_ptr<float>(), c,
                      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_loss, stats};
}

at::Tensor kd_loss_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                                 double temperature, std::string_view divergence, double beta, int64_t ignore_index,
                                 double soft_coef, double hard_weight) {
  c10::cuda::CUDAGuard guard(student.device());
  KdLossArgs a = kd_loss_args(student, teacher, labels, temperature, std::string(divergence), beta, ignore_index,
                            soft_coef, hard_weight);
  glue::kd_check_backward(grad_rows, stats, a.params, student.device());
  at::Tensor g = grad_rows.contiguous(), st = stats.contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.params.rows == 0) return grad;
  const auto c = kd::kd_launch_config(a.params.rows, a.params.vocab, kd::kd_vec_for(a.params.student_dtype, a.params.teacher_dtype), 0,
                                      0, sm_count());
  kd::kd_backward_cuda(a.params, g.data_ptr<float>(), st.data_ptr<float>(), grad.data_ptr(), c,
                       c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("kd_loss_forward", &kd_loss_forward_cuda);
  m.impl("kd_loss_backward", &kd_loss_backward_cuda);
}

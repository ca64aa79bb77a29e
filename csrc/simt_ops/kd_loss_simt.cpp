// The distillation-loss GPU kernels on CPU tensors through the SIMT emulator (test-only ops
// torch.ops.fastdistill_simt.kd_loss_*): the CUDA ops' glue (glue/kd_loss.h) plus launch knobs (threads per
// block, row splits; 0 = the choice the launch rule makes for a GPU with 8 multiprocessors).
#include <torch/library.h>

#include "glue/kd_loss.h"

namespace fastdistill {
namespace {

GpuBackend emulator(int64_t threads, int64_t splits) {
  TORCH_CHECK(threads == 0 || (threads % 32 == 0 && threads <= 1024),
              "fastdistill_simt.kd_loss: threads must be 0 (auto) or a multiple of 32 up to 1024, got ", threads);
  TORCH_CHECK(splits >= 0, "fastdistill_simt.kd_loss: splits must be >= 0, got ", splits);
  GpuBackend b;
  b.kd_threads = int(threads);
  b.kd_splits = int(splits);
  return b;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    c10::string_view divergence, double beta, int64_t ignore_index,
                                                    double soft_coef, double hard_weight, int64_t threads,
                                                    int64_t splits) {
  TORCH_CHECK(student.device().is_cpu(), "fastdistill_simt.kd_loss_forward: expects CPU tensors");
  return kd_loss_forward_gpu(emulator(threads, splits), student, teacher, labels, temperature,
                             std::string(divergence), beta, ignore_index, soft_coef, hard_weight);
}

at::Tensor kd_loss_backward(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature,
                            c10::string_view divergence, double beta, int64_t ignore_index, double soft_coef,
                            double hard_weight, int64_t threads, int64_t splits) {
  return kd_loss_backward_gpu(emulator(threads, splits), grad_rows, student, teacher, labels, stats, temperature,
                              std::string(divergence), beta, ignore_index, soft_coef, hard_weight);
}

at::Tensor kd_loss_partial(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                           double temperature, c10::string_view divergence, double beta, int64_t ignore_index,
                           double soft_coef, double hard_weight, int64_t threads, int64_t splits) {
  return kd_loss_partial_gpu(emulator(threads, splits), student, teacher, labels, temperature, std::string(divergence),
                             beta, ignore_index, soft_coef, hard_weight);
}

at::Tensor kd_loss_jsd_sums(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                            double temperature, double beta, int64_t threads, int64_t splits) {
  return kd_loss_jsd_sums_gpu(emulator(threads, splits), student, teacher, stats, temperature, beta);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill_simt, m) {
  m.def("kd_loss_forward(Tensor student, Tensor teacher, Tensor? labels, float temperature, str divergence, "
        "float beta, int ignore_index, float soft_coef, float hard_weight, int threads=0, int splits=0) "
        "-> (Tensor, Tensor)");
  m.def("kd_loss_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? labels, Tensor stats, "
        "float temperature, str divergence, float beta, int ignore_index, float soft_coef, float hard_weight, "
        "int threads=0, int splits=0) -> Tensor");
  m.def("kd_loss_partial(Tensor student, Tensor teacher, Tensor? labels, float temperature, str divergence, "
        "float beta, int ignore_index, float soft_coef, float hard_weight, int threads=0, int splits=0) -> Tensor");
  m.def("kd_loss_jsd_sums(Tensor student, Tensor teacher, Tensor stats, float temperature, float beta, "
        "int threads=0, int splits=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CPU, m) {
  m.impl("kd_loss_forward", &kd_loss_forward);
  m.impl("kd_loss_backward", &kd_loss_backward);
  m.impl("kd_loss_partial", &kd_loss_partial);
  m.impl("kd_loss_jsd_sums", &kd_loss_jsd_sums);
}

}  // namespace fastdistill

// The top-k teacher loss's GPU kernels on CPU tensors through the SIMT emulator (test-only ops
// torch.ops.fastdistill_simt.kd_topk_*): the CUDA ops' glue (glue/kd_topk.h) plus the threads-per-block knob
// (0 = the launch rule's choice).
#include <torch/library.h>

#include "glue/kd_topk.h"

namespace fastdistill {
namespace {

GpuBackend emulator(int64_t threads) {
  TORCH_CHECK(threads == 0 || (threads % 32 == 0 && threads <= 1024),
              "fastdistill_simt.kd_topk: threads must be 0 (auto) or a multiple of 32 up to 1024, got ", threads);
  GpuBackend b;
  b.kd_threads = int(threads);
  return b;
}

std::tuple<at::Tensor, at::Tensor> kd_topk_forward(const at::Tensor& student, const at::Tensor& indices,
                                                    const at::Tensor& logprobs, const std::optional<at::Tensor>& labels,
                                                    double temperature, c10::string_view divergence, double beta,
                                                    int64_t ignore_index, double soft_coef, double hard_weight,
                                                    c10::string_view tail, int64_t threads) {
  TORCH_CHECK(student.device().is_cpu(), "fastdistill_simt.kd_topk_forward: expects CPU tensors");
  return kd_topk_forward_gpu(emulator(threads), student, indices, logprobs, labels, temperature,
                             std::string(divergence), beta, ignore_index, soft_coef, hard_weight, std::string(tail));
}

at::Tensor kd_topk_backward(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& indices,
                            const at::Tensor& logprobs, const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                            double temperature, c10::string_view divergence, double beta, int64_t ignore_index,
                            double soft_coef, double hard_weight, c10::string_view tail, int64_t threads) {
  return kd_topk_backward_gpu(emulator(threads), grad_rows, student, indices, logprobs, labels, stats, temperature,
                              std::string(divergence), beta, ignore_index, soft_coef, hard_weight, std::string(tail));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill_simt, m) {
  m.def("kd_topk_forward(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight, str tail, int threads=0) "
        "-> (Tensor, Tensor)");
  m.def("kd_topk_backward(Tensor grad_rows, Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, "
        "Tensor stats, float temperature, str divergence, float beta, int ignore_index, float soft_coef, "
        "float hard_weight, str tail, int threads=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CPU, m) {
  m.impl("kd_topk_forward", &kd_topk_forward);
  m.impl("kd_topk_backward", &kd_topk_backward);
}

}  // namespace fastdistill

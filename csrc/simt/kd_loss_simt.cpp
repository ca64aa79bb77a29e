// The kd_loss CUDA kernels (fastdistill/kd_loss.cuh) run on CPU tensors through the SIMT emulator.
// Same schema as fastdistill::kd_loss_* plus launch knobs (threads per block, row splits; 0 = the
// choice the CUDA path would make on a GPU with 8 multiprocessors).
#include <torch/library.h>

#include "cuda/kd_loss_glue.h"
#include "fastdistill/kd_loss.cuh"

#include <string>

namespace {

using namespace fastdistill;

constexpr int kEmulatedSms = 8;

void check_knobs(int64_t threads, int64_t splits) {
  TORCH_CHECK(threads == 0 || (threads % 32 == 0 && threads <= 1024),
              "fastdistill_simt.kd_loss: threads must be 0 (auto) or a multiple of 32 up to 1024, got ", threads);
  TORCH_CHECK(splits >= 0, "fastdistill_simt.kd_loss: splits must be >= 0, got ", splits);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_simt(const at::Tensor& student, const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& labels, double temperature,
                                                        std::string_view divergence, double beta,
                                                        int64_t ignore_index, double soft_coef, double hard_weight,
                                                        int64_t threads, int64_t splits) {
  TORCH_CHECK(student.device().is_cpu(), "fastdistill_simt.kd_loss_forward: expects CPU tensors");
  check_knobs(threads, splits);
  KdLossArgs a = kd_loss_args(student, teacher, labels, temperature, std::string(divergence), beta, ignore_index,
                            soft_coef, hard_weight);
  auto opts = student.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({a.params.rows}, opts), stats = at::empty({a.params.rows, kNumStats}, opts);
  const auto c = kd::kd_launch_config(a.params.rows, a.params.vocab, kd::kd_vec_for(a.params.student_dtype, a.params.teacher_dtype),
                                      int(threads), int(splits), kEmulatedSms);
  at::Tensor ws = at::empty({kd::kd_forward_workspace_floats(a.params.rows, c.splits)}, opts);
  kd::kd_dispatch(a.params.student_dtype, a.params.teacher_dtype, [&]<class Ts, class Tt>() {
    kd::kd_forward_launch<Ts, Tt>(a.params, row_loss.data_ptr<float>(), stats.data_ptr<float>(), ws.data_ptr<float>(), c,
                                  nullptr);
  });
  return {row_loss, stats};
}

at::Tensor kd_loss_backward_simt(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                                 double temperature, std::string_view divergence, double beta, int64_t ignore_index,
                                 double soft_coef, double hard_weight, int64_t threads, int64_t splits) {
  check_knobs(threads, splits);
  KdLossArgs a = kd_loss_args(student, teacher, labels, temperature, std::string(divergence), beta, ignore_index,
                            soft_coef, hard_weight);
  glue::kd_check_backward(grad_rows, stats, a.params, student.device());
  at::Tensor g = grad_rows.contiguous(), st = stats.contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  const auto c = kd::kd_launch_config(a.params.rows, a.params.vocab, kd::kd_vec_for(a.params.student_dtype, a.params.teacher_dtype),
                                      int(threads), int(splits), kEmulatedSms);
  kd::kd_dispatch(a.params.student_dtype, a.params.teacher_dtype, [&]<class Ts, class Tt>() {
    kd::kd_backward_launch<Ts, Tt>(a.params, g.data_ptr<float>(), st.data_ptr<float>(), grad.data_ptr(), c, nullptr);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill_simt, m) {
  m.def("kd_loss_forward(Tensor student, Tensor teacher, Tensor? labels, float temperature, str divergence, "
        "float beta, int ignore_index, float soft_coef, float hard_weight, int threads=0, int splits=0) "
        "-> (Tensor, Tensor)");
  m.def("kd_loss_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? labels, Tensor stats, "
        "float temperature, str divergence, float beta, int ignore_index, float soft_coef, float hard_weight, "
        "int threads=0, int splits=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CPU, m) {
  m.impl("kd_loss_forward", &kd_loss_forward_simt);
  m.impl("kd_loss_backward", &kd_loss_backward_simt);
}

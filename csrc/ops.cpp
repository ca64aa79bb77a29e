// Every fastdistill op schema, defined once. Device implementations register themselves in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cpp with TORCH_LIBRARY_IMPL; fake (meta) kernels and
// autograd live in fastdistill/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastdistill, m) {
  // ---- fused distillation loss (issue 2) ----
  // Per-row loss (fp32, [rows]) and per-row statistics for the backward (fp32, [rows, 8]: the
  // logsumexps of student/T, teacher/T and student as (max, log sum) pairs, and the divergence's
  // auxiliary term; see csrc/include/fastdistill/kd_loss.h).
  m.def("kd_loss_forward(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight) "
        "-> (Tensor, Tensor)");
  // Gradient w.r.t. the student logits, given d loss / d row_loss ([rows], fp32).
  m.def("kd_loss_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? labels, "
        "Tensor stats, float temperature, str divergence, float beta, int ignore_index, "
        "float soft_coef, float hard_weight) -> Tensor");

  // ---- int8 quantized inference (issue 3) ----

  // ---- 2:4 structured sparsity (issue 4) ----
}

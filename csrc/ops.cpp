// Every fastdistill op schema, defined once. Device implementations register themselves in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cpp with TORCH_LIBRARY_IMPL; fake (meta) kernels and
// autograd live in fastdistill/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastdistill, m) {
  // ---- fused distillation loss (issue 2) ----
  // Per-row loss (fp32, [rows]) and per-row statistics (fp32, [rows, 4]:
  // lse(student/T), lse(teacher/T), lse(student), divergence auxiliary) for the backward.
  m.def("kd_loss_forward(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight) "
        "-> (Tensor, Tensor)");
  // Gradient w.r.t. the student logits, given d loss / d row_loss ([rows], fp32).
  m.def("kd_loss_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? labels, "
        "Tensor stats, float temperature, str divergence, float beta, int ignore_index, "
        "float soft_coef, float hard_weight) -> Tensor");

  // ---- int8 quantized inference (issue 3) ----
  // Symmetric int8, zero point 0: s = amax / 127, q = clamp(round_half_even(x / s), -127, 127);
  // a row of zeros has s = 0 and q = 0. Scales are fp32 whatever the input dtype.
  // x (..., K) fp32/bf16/fp16 -> (int8 (..., K), fp32 scales (...)), one scale per row (token).
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  // w [N, K] fp32/bf16/fp16 -> (int8 [N, K], fp32 [N]); NaN/Inf in w is an error.
  m.def("quantize_per_channel(Tensor w) -> (Tensor, Tensor)");
  // int8 [N, K] -> the device's opaque packed layout (1-D int8). On CPU it is ISA-independent:
  // a 64-byte header (magic, version, N, K), int32 column compensation, then the weights in
  // 16-column x 4-k tiles (VNNI order). Only ever consumed by the ops below on the same device.
  m.def("int8_pack_weight(Tensor w_int8) -> Tensor");
  // Inverse of int8_pack_weight: packed -> int8 [N, K] (N and K given so fake kernels know the shape).
  m.def("int8_unpack_weight(Tensor w_packed, int N, int K) -> Tensor");
  // Dynamic W8A8: y = (q(x) @ w_int8^T) * s_x[m] * w_scales[n] + bias, per-token quantisation of
  // x fused inside, int32 accumulation. x (..., K) fp32/bf16/fp16; N = w_scales.size(0);
  // bias [N] (any float dtype) or None; the output has x's dtype and shape (..., N).
  m.def("int8_linear(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias) -> Tensor");
  // Weight-only: y = x @ (w_int8 * w_scales[:, None])^T + bias, weights dequantised on the fly,
  // fp32 accumulation. Same shapes and dtypes as int8_linear.
  m.def("int8_weight_only_linear(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias) -> Tensor");
  // Exact integer GEMM through the same kernels: x_int8 (..., K) @ w_int8 [N, K]^T -> int32 (..., N).
  m.def("int8_gemm_s32(Tensor x_int8, Tensor w_int8) -> Tensor");

  // ---- 2:4 structured sparsity (issue 4) ----
}

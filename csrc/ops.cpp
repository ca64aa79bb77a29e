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
  // Forward and gradient in one call, for training (fastdistill.loss): kd_loss_forward's outputs and
  // d loss / d student for a unit grad_output of the loss reduced as `reduction` says (batchmean,
  // sum, mean, none). Each row's gradient is written while the row is still in cache.
  m.def("kd_loss_fused(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight, "
        "str reduction) -> (Tensor, Tensor, Tensor)");

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
  // values / meta: as returned by sparse24_pack on the device that runs the op. The canonical
  // (state_dict) format is values [N, K/2] (weight dtype, kept entries in ascending column order)
  // and meta uint8 [N, ceil(K/8)] (per group of 4 columns the code idx0 | idx1 << 2, two groups per
  // byte, low nibble first). A device may repack into its own layout, but the packed values keep
  // size(0) == N so the shape of every output is known without running the kernel. The CPU kernels
  // read the canonical layout directly, so on CPU sparse24_pack returns contiguous copies.
  m.def("sparse24_pack(Tensor values, Tensor meta) -> (Tensor, Tensor)");
  // y[..., N] = x[..., K] @ W^T (+ bias) for a 2:4 weight with fp32 or bf16 values; fp32
  // accumulation; y has x's dtype (fp32 or bf16). K is x.size(-1); N is values.size(0).
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
  // The same with int8 values and per-output-channel fp32 scales w_scales [N]: x is quantized per
  // token inside the op (symmetric, s = amax / 127, q = clamp(round_half_even(x / s), -127, 127)),
  // int32 accumulation, fused dequant (acc * s_x * s_w) + bias; y has x's dtype (fp32 or bf16).
  m.def("sparse24_int8_linear(Tensor x, Tensor values, Tensor meta, Tensor w_scales, Tensor? bias) "
        "-> Tensor");
}

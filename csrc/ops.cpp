// Every fastdistill op schema, defined once. Each device registers its impls in its own file
// (csrc/cpu/<family>_cpu.cpp, csrc/cuda/<family>_cuda.cpp); what each op accepts is stated once per family in
// csrc/glue/<family>.h; fake (meta) kernels and autograd live in fastdistill/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastdistill, m) {
  // ---- fused distillation loss ----
  // Per-row loss (fp32, [rows]) and per-row statistics for the backward (fp32, [rows, 8]: the logsumexps of
  // student/T, teacher/T and student as (max, log sum) pairs, and the divergence's auxiliary term; see
  // csrc/include/fastdistill/kd_loss.h).
  m.def("kd_loss_forward(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight) "
        "-> (Tensor, Tensor)");
  // Gradient w.r.t. the student logits, given d loss / d row_loss ([rows], fp32).
  m.def("kd_loss_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? labels, "
        "Tensor stats, float temperature, str divergence, float beta, int ignore_index, "
        "float soft_coef, float hard_weight) -> Tensor");
  // Forward and gradient in one call, for training (fastdistill.loss): kd_loss_forward's outputs and
  // d loss / d student for d loss / d row_loss = grad_scale on every row (the reduction's weight). Each row's
  // gradient is written while the row is still in cache.
  m.def("kd_loss_fused(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight, "
        "float grad_scale) -> (Tensor, Tensor, Tensor)");
  // Against a top-k teacher (csrc/include/fastdistill/kd_topk.h): indices (..., k) integer and logprobs (..., k)
  // fp32/bf16/fp16, the teacher's log-probabilities at the temperature (-inf: unused slot); tail 'bucket' or
  // 'renormalize'. Outputs as kd_loss_forward's, with kd_topk's statistics.
  m.def("kd_topk_forward(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight, str tail) "
        "-> (Tensor, Tensor)");
  m.def("kd_topk_backward(Tensor grad_rows, Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, "
        "Tensor stats, float temperature, str divergence, float beta, int ignore_index, float soft_coef, "
        "float hard_weight, str tail) -> Tensor");
  // kd_loss_fused's counterpart (CPU): kd_topk_forward's outputs and the gradient for d loss / d row_loss = grad_scale.
  m.def("kd_topk_fused(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight, str tail, "
        "float grad_scale) -> (Tensor, Tensor, Tensor)");

  // Vocab-parallel shards (fastdistill/distributed.py): the unfinished per-row softmax state of this shard's columns
  // (fp32 [rows, 8]: kd_loss.h's KdPartialField), which the ranks merge with all-reduces (labels are global indices
  // and only say whether there is a hard term); and JSD's two per-row sums over the shard ([rows, 2]) from the
  // merged statistics (kd_loss_forward's [rows, 8] layout).
  m.def("kd_loss_partial(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
        "str divergence, float beta, int ignore_index, float soft_coef, float hard_weight) -> Tensor");
  m.def("kd_loss_jsd_sums(Tensor student, Tensor teacher, Tensor stats, float temperature, float beta) -> Tensor");

  // ---- int8 quantized inference ----
  // Symmetric int8, zero point 0: s = amax / 127, q = clamp(round_half_even(x / s), -127, 127);
  // a row of zeros has s = 0 and q = 0. Scales are fp32 whatever the input dtype.
  // x (..., K) fp32/bf16/fp16 -> (int8 (..., K), fp32 scales (...)), one scale per row (token).
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  // w [N, K] fp32/bf16/fp16 -> (int8 [N, K], fp32 [N]); NaN/Inf in w is an error.
  m.def("quantize_per_channel(Tensor w) -> (Tensor, Tensor)");
  // int8 [N, K] -> the device's opaque packed layout (1-D int8; fastdistill._C.int8_packed_numel gives its size).
  // Only ever consumed by the ops below on the same device.
  m.def("int8_pack_weight(Tensor w_int8) -> Tensor");
  // Inverse of int8_pack_weight: packed -> int8 [N, K] (N and K given so fake kernels know the shape).
  m.def("int8_unpack_weight(Tensor w_packed, int N, int K) -> Tensor");
  // Dynamic W8A8: y = (q(x) @ w_int8^T) * s_x[m] * w_scales[n] + bias, per-token quantisation of
  // x fused inside, int32 accumulation. x (..., K) fp32/bf16/fp16; N = w_scales.size(0);
  // bias [N] (any float dtype) or None. The epilogue then applies `activation` in fp32: 'none', 'relu', 'gelu' (erf
  // form) or 'gelu_tanh' (fastdistill/int8.h). The output has shape (..., N) and dtype out_dtype (fp32, bf16 or
  // fp16; None: x's dtype).
  m.def("int8_linear(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias, str activation=\"none\", "
        "ScalarType? out_dtype=None) -> Tensor");
  // Weight-only: y = x @ (w_int8 * w_scales[:, None])^T + bias, weights dequantised on the fly,
  // fp32 accumulation. Same shapes and dtypes as int8_linear.
  m.def("int8_weight_only_linear(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias) -> Tensor");
  // Exact integer GEMM through the same kernels: x_int8 (..., K) @ w_int8 [N, K]^T -> int32 (..., N).
  m.def("int8_gemm_s32(Tensor x_int8, Tensor w_int8) -> Tensor");
  // int8 Conv2d (CPU only so far), NHWC inside. w_int8 [Cout, Cin / groups, kh, kw] (per-output-channel symmetric
  // int8) -> the device's opaque packed conv layout; groups is 1 or depthwise (groups == Cin == Cout).
  m.def("int8_conv2d_pack_weight(Tensor w_int8, int groups) -> Tensor");
  // The inverse: the int8 [Cout, Cin / groups, kh, kw] weight (`shape`, checked against the packed header).
  m.def("int8_conv2d_unpack_weight(Tensor w_packed, int[4] shape) -> Tensor");
  // y = act(conv(q(x), w_int8) * s_x * w_scales[n] + bias[n] + residual), int32 accumulation. x [N, C, H, W]
  // fp32/bf16/fp16 in any memory format (channels_last is read in place; another layout is converted once); q(x)
  // per tensor with the static scale x_scale (fp32, 1 element: calibrated, out-of-range values saturate at +-127)
  // or, when None, s_x = amax(|x|) / 127 of this input. residual (the output's shape and x's dtype) or None;
  // activation 'none' | 'relu' | 'relu6', applied after the residual add. The output [N, Cout, OH, OW] has x's dtype
  // and is channels_last.
  m.def("int8_conv2d(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias, Tensor? x_scale, Tensor? residual, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups, str activation) -> Tensor");

  // ---- 2:4 structured sparsity ----
  // values / meta in the canonical (state_dict) format: values [N, K/2] (weight dtype, kept entries in ascending
  // column order) and meta uint8 [N, ceil(K/8)] (per group of 4 columns the code idx0 | idx1 << 2, two groups per
  // byte, low nibble first). sparse24_pack returns the layout the device's kernels read (keeping size(0) == N);
  // every device reads the canonical layout today, so it is a contiguous copy.
  m.def("sparse24_pack(Tensor values, Tensor meta) -> (Tensor, Tensor)");
  // y[..., N] = x[..., K] @ W^T (+ bias) for a 2:4 weight with fp32, bf16 or fp16 values; x fp32, bf16 or fp16;
  // fp32 accumulation; y has x's dtype. K is x.size(-1); N is values.size(0).
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
  // The same with int8 values and per-output-channel fp32 scales w_scales [N]: x is quantized per token inside the
  // op (as quantize_per_token), int32 accumulation, fused dequant (acc * s_x * s_w) + bias; y has x's dtype.
  m.def("sparse24_int8_linear(Tensor x, Tensor values, Tensor meta, Tensor w_scales, Tensor? bias) "
        "-> Tensor");
}

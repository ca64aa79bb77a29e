// The torch-facing layer of the 2:4 ops, shared by the CPU, CUDA and emulator registrations: what the ops
// accept, sparse24_pack (every device's kernels read the canonical layout, so packing is a contiguous copy),
// and the GPU launch sequence.
//
// Accepted everywhere: x fp32 / bf16 / fp16 (..., K) with K % 4 == 0; sparse24_linear values fp32 / bf16 /
// fp16, sparse24_int8_linear values int8 with fp32 per-row w_scales; meta uint8 [N, ceil(K/8)]; bias [N] of any
// float dtype. The output has x's dtype.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "fastdistill/sparse24.h"
#include "glue/int8.h"

namespace fastdistill::sparse24 {

inline bool is_float_values(const at::Tensor& v) {
  return v.scalar_type() == at::kFloat || v.scalar_type() == at::kBFloat16 || v.scalar_type() == at::kHalf;
}

inline ValKind val_kind(const at::Tensor& v) {
  switch (v.scalar_type()) {
    case at::kFloat: return ValKind::f32;
    case at::kBFloat16: return ValKind::bf16;
    case at::kHalf: return ValKind::f16;
    default: return ValKind::s8;
  }
}

// Checks of sparse24_linear (w_scales null) and sparse24_int8_linear; returns K.
inline int64_t check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& values,
                                   const at::Tensor& meta, const at::Tensor* w_scales,
                                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "fastdistill.", op, ": x must have at least 1 dimension, got a 0-dim tensor");
  int8::float_dtype(op, "x", x);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % 4 == 0, "fastdistill.", op, ": 2:4 sparsity needs K (x.size(-1)) to be a multiple of 4, got K=", K);
  TORCH_CHECK(values.dim() == 2, "fastdistill.", op, ": values must be 2-D [N, K/2], got ", values.sizes());
  const int64_t N = values.size(0);
  TORCH_CHECK(values.size(1) == K / 2, "fastdistill.", op, ": values must be [N, K/2] = [", N, ", ", K / 2,
              "] to match x with K=", K, ", got ", values.sizes());
  if (w_scales == nullptr) {
    TORCH_CHECK(is_float_values(values), "fastdistill.", op,
                ": values must be float32, bfloat16 or float16 (int8 values go through sparse24_int8_linear), got ",
                values.scalar_type());
  } else {
    TORCH_CHECK(values.scalar_type() == at::kChar, "fastdistill.", op, ": values must be int8, got ",
                values.scalar_type());
    TORCH_CHECK(w_scales->scalar_type() == at::kFloat && w_scales->dim() == 1 && w_scales->size(0) == N,
                "fastdistill.", op, ": w_scales must be float32 [N] = [", N, "], got ", w_scales->scalar_type(), " ",
                w_scales->sizes());
    int8::check_same_device(op, "w_scales", *w_scales, x);
  }
  TORCH_CHECK(meta.scalar_type() == at::kByte, "fastdistill.", op, ": meta must be uint8, got ", meta.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 7) / 8, "fastdistill.", op,
              ": meta must be [N, ceil(K/8)] = [", N, ", ", (K + 7) / 8, "], got ", meta.sizes());
  int8::check_same_device(op, "values", values, x);
  int8::check_same_device(op, "meta", meta, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "fastdistill.", op, ": bias must be [N] = [", N, "], got ",
                bias->sizes());
    int8::float_dtype(op, "bias", *bias);
    int8::check_same_device(op, "bias", *bias, x);
  }
  return K;
}

inline std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& values, const at::Tensor& meta) {
  constexpr const char* op = "fastdistill.sparse24_pack";
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.sizes());
  TORCH_CHECK(is_float_values(values) || values.scalar_type() == at::kChar, op,
              ": values must be float32, bfloat16, float16 or int8, got ", values.scalar_type());
  const int64_t N = values.size(0), K = 2 * values.size(1);
  TORCH_CHECK(K % 4 == 0, op, ": values.size(1) = K/2 must be even (K a multiple of 4), got ", values.size(1));
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 7) / 8,
              op, ": meta must be uint8 [N, ceil(K/8)] = [", N, ", ", (K + 7) / 8, "], got ", meta.scalar_type(), " ",
              meta.sizes());
  TORCH_CHECK(meta.device() == values.device(), op, ": values and meta must be on the same device, got ",
              values.device(), " and ", meta.device());
  return {values.contiguous().clone(), meta.contiguous().clone()};
}

// ---- GPU (CUDA and the emulator) ----
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

inline bool aligned(const at::Tensor& t, uintptr_t a) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % a == 0; }

// sparse24_linear (w_scales = None) and sparse24_int8_linear.
inline at::Tensor linear_gpu(const GpuBackend& b, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const std::optional<at::Tensor>& w_scales, const std::optional<at::Tensor>& bias_in) {
  const bool int8 = w_scales.has_value();
  const char* op = int8 ? "sparse24_int8_linear" : "sparse24_linear";
  const int64_t K = check_linear_inputs(op, x, values, meta, int8 ? &*w_scales : nullptr, bias_in);
  const int64_t N = values.size(0);
  const DType dt = int8::float_dtype(op, "x", x);
  const at::Tensor vals = values.contiguous(), met = meta.contiguous();
  const at::Tensor x2 = int8::as_rows(x).contiguous();
  const int64_t M = x2.size(0);
  const auto shape = int8::out_shape(x, N);
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(shape);
  if (K == 0) {
    if (bias.defined()) out.copy_(bias.unsqueeze(0).expand({M, N}));
    else out.zero_();
    return out.view(shape);
  }
  if (M > 16 && b.vendor_gemm) {
    // Decompress + vendor GEMM (cuBLAS / cuBLASLt int8) beyond the GEMV's range.
    at::Tensor dense = at::empty({N, K}, vals.options());
    gpu::decompress(val_kind(vals), vals.data_ptr(), met.data_ptr<uint8_t>(), N, K, dense.data_ptr(), b.max_blocks,
                    b.stream);
    b.launched();
    if (!int8) {
      at::Tensor y = at::linear(x2.to(dense.scalar_type()), dense,
                                bias.defined() ? std::optional<at::Tensor>(bias.to(dense.scalar_type())) : std::nullopt);
      return y.to(x.scalar_type()).view(shape);
    }
    // int8: the W8A8 path of int8_linear on the dense int8 weight (torch._int_mm + our epilogue)
    return int8::linear_gpu(b, x2, int8::pack_weight_gpu(dense), *w_scales,
                            bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, false)
        .view(shape);
  }
  const int64_t kp = round_up(K, 32);
  Sparse24Params p;
  p.values = vals.data_ptr();
  p.meta = met.data_ptr<uint8_t>();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.m = M;
  p.n = N;
  p.k = K;
  p.k_pad = kp;
  p.ldo = N;
  p.out_kind = int8::out_kind(dt);
  const bool vec = K % 32 == 0 && aligned(vals, 16) && aligned(met, 4);
  at::Tensor xbuf, xs, ws;
  if (int8) {
    xbuf = at::empty({M, kp}, x.options().dtype(at::kChar));
    xs = at::empty({M}, x.options().dtype(at::kFloat));
    int8::quantize_into(b, x2, dt, xbuf, kp, kp, xs);
    ws = w_scales->contiguous();
    p.qx = xbuf.data_ptr<int8_t>();
    p.x_scales = xs.data_ptr<float>();
    p.w_scales = ws.data_ptr<float>();
  } else {
    xbuf = at::empty({M, kp}, x.options().dtype(at::kFloat));
    int8::gpu::to_f32_padded(dt, x2.data_ptr(), M, K, K, kp, xbuf.data_ptr<float>(), b.stream);
    b.launched();
    p.xf = xbuf.data_ptr<float>();
  }
  gpu::gemv(val_kind(vals), p, vec, b.stream);
  b.launched();
  return out.view(shape);
}

}  // namespace fastdistill::sparse24

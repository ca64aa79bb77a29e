// Torch glue of the 2:4 GPU ops, written once over a backend (CUDA: sparse24_cuda.cpp; SIMT emulator
// test ops: csrc/simt/sparse24_simt.cpp). A Backend provides gemv(ValKind, Sparse24Params, vec),
// decompress(ValKind, values, meta, n, k, dense), quantize(DType, QuantParams),
// to_f32(DType, x, rows, ldx, k, k_pad, out) and `bool dense_fallback` (M > 16 through decompress + a
// vendor GEMM; false: our GEMV tiles for every M).
//
// The GPU kernels read the canonical layout, so sparse24_pack returns contiguous copies (as on CPU).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cuda/int8_glue.h"
#include "fastdistill/sparse24_params.h"

namespace fastdistill::sparse24glue {

using namespace fastdistill::sparse24;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

inline ValKind val_kind(const at::Tensor& v) {
  switch (v.scalar_type()) {
    case at::kFloat: return ValKind::f32;
    case at::kBFloat16: return ValKind::bf16;
    case at::kHalf: return ValKind::f16;
    default: return ValKind::s8;
  }
}

// Checks shared by both linear ops (same messages as the CPU ops); returns K.
inline int64_t check_common(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a 0-dim tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % 4 == 0, op, ": 2:4 sparsity needs K (x.size(-1)) to be a multiple of 4, got K=", K);
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.sizes());
  const int64_t N = values.size(0);
  TORCH_CHECK(values.size(1) == K / 2, op, ": values must be [N, K/2] = [", N, ", ", K / 2, "] to match x, got ",
              values.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kByte, op, ": meta must be uint8, got ", meta.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 7) / 8, op,
              ": meta must be [N, ceil(K/8)] = [", N, ", ", (K + 7) / 8, "], got ", meta.sizes());
  TORCH_CHECK(values.device() == x.device() && meta.device() == x.device(), op,
              ": x, values and meta must be on the same device, got ", x.device(), ", ", values.device(), " and ",
              meta.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N] = [", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->is_floating_point(), op, ": bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on ", x.device(), ", got ", bias->device());
  }
  return K;
}

inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = n;
  return s;
}

inline bool aligned(const at::Tensor& t, uintptr_t a) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % a == 0; }

template <class B>
at::Tensor linear(B& b, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& w_scales, const std::optional<at::Tensor>& bias_in, bool int8) {
  const char* op = int8 ? "fastdistill.sparse24_int8_linear" : "fastdistill.sparse24_linear";
  const int64_t K = check_common(op, x, values, meta, bias_in);
  const int64_t N = values.size(0);
  if (int8) {
    TORCH_CHECK(values.scalar_type() == at::kChar, op, ": values must be int8, got ", values.scalar_type());
    const at::Tensor& ws = *w_scales;
    TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.dim() == 1 && ws.size(0) == N, op,
                ": w_scales must be float32 [N] = [", N, "], got ", ws.scalar_type(), " ", ws.sizes());
    TORCH_CHECK(ws.device() == x.device(), op, ": w_scales must be on ", x.device(), ", got ", ws.device());
  } else {
    TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16 ||
                    values.scalar_type() == at::kHalf,
                op, ": values must be float32, bfloat16 or float16 (int8 values go through sparse24_int8_linear), got ",
                values.scalar_type());
  }
  const DType dt = int8glue::float_dtype(op, "x", x);
  const at::Tensor vals = values.contiguous(), met = meta.contiguous();
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape(x, N));
  if (K == 0) {
    if (bias.defined()) out.copy_(bias.unsqueeze(0).expand({M, N}));
    else out.zero_();
    return out.view(out_shape(x, N));
  }
  if (M > 16 && b.dense_fallback) {
    // Decompress + vendor GEMM (cuBLAS / cuBLASLt int8): the last resort beyond the GEMV's range.
    at::Tensor dense = at::empty({N, K}, vals.options());
    b.decompress(val_kind(vals), vals.data_ptr(), met.data_ptr<uint8_t>(), N, K, dense.data_ptr());
    if (!int8) {
      at::Tensor y = at::linear(x2.to(dense.scalar_type()), dense,
                                bias.defined() ? std::optional<at::Tensor>(bias.to(dense.scalar_type())) : std::nullopt);
      return y.to(x.scalar_type()).view(out_shape(x, N));
    }
    // int8: the W8A8 path of int8_linear on the dense int8 weight (torch._int_mm + our epilogue)
    at::Tensor packed = int8glue::pack_weight(dense);
    return int8glue::linear(b, x2, packed, *w_scales, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                            false)
        .view(out_shape(x, N));
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
  p.out_kind = int8glue::out_kind(dt);
  const bool vec = K % 32 == 0 && aligned(vals, 16) && aligned(met, 4);
  at::Tensor xbuf, xs, ws;
  if (int8) {
    xbuf = at::empty({M, kp}, x.options().dtype(at::kChar));
    xs = at::empty({M}, x.options().dtype(at::kFloat));
    int8glue::quantize_into(b, x2, dt, xbuf, kp, kp, xs);
    ws = w_scales->contiguous();
    p.qx = xbuf.data_ptr<int8_t>();
    p.x_scales = xs.data_ptr<float>();
    p.w_scales = ws.data_ptr<float>();
  } else {
    xbuf = at::empty({M, kp}, x.options().dtype(at::kFloat));
    b.to_f32(dt, x2.data_ptr(), M, K, K, kp, xbuf.data_ptr<float>());
    p.xf = xbuf.data_ptr<float>();
  }
  b.gemv(val_kind(vals), p, vec);
  return out.view(out_shape(x, N));
}

inline std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& values, const at::Tensor& meta) {
  constexpr const char* op = "fastdistill.sparse24_pack";
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16 ||
                  values.scalar_type() == at::kHalf || values.scalar_type() == at::kChar,
              op, ": values must be float32, bfloat16, float16 or int8, got ", values.scalar_type());
  const int64_t N = values.size(0), K = 2 * values.size(1);
  TORCH_CHECK(K % 4 == 0, op, ": values.size(1) = K/2 must be even (K a multiple of 4), got ", values.size(1));
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 7) / 8,
              op, ": meta must be uint8 [N, ceil(K/8)] = [", N, ", ", (K + 7) / 8, "], got ", meta.scalar_type(), " ",
              meta.sizes());
  return {values.contiguous().clone(), meta.contiguous().clone()};
}

}  // namespace fastdistill::sparse24glue

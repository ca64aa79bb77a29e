// Torch glue of the int8 GPU ops, written once over a backend: the CUDA impls (int8_cuda.cpp, kernels
// in int8.cu) and the SIMT-emulator test ops (csrc/simt/int8_simt.cpp, same kernels on the CPU).
// A Backend provides quantize(DType, QuantParams), gemv(GemvParams, weight_only),
// to_f32(DType, x, rows, ldx, k, k_pad, out), epilogue(...), and `bool int_mm` (whether M > 16 goes
// through torch._int_mm + our epilogue).
//
// GPU packed weight: int8 1-D of N * Kp + (Kp - K) elements, Kp = round_up(K, 16): [N, Kp] row-major,
// zero padded (int8_params.h), then Kp - K zero bytes so that the size alone identifies K for a given N
// (N comes from w_scales, K from x: the ops validate a packed weight without reading it on the host).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "fastdistill/int8_params.h"

namespace fastdistill::int8glue {

using namespace fastdistill::int8;

inline DType float_dtype(const char* op, const char* what, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK(false, "fastdistill.", op, ": ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline OutKind out_kind(DType t) { return t == DType::f32 ? OutKind::f32 : t == DType::bf16 ? OutKind::bf16 : OutKind::f16; }

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Quantises rows of a contiguous [m, k] float tensor into [m, ldq] int8 (zero padded to k_pad).
template <class B>
void quantize_into(B& b, const at::Tensor& x2, DType dt, at::Tensor& q, int64_t ldq, int64_t k_pad, at::Tensor& scales) {
  QuantParams p;
  p.x = x2.data_ptr();
  p.rows = x2.size(0);
  p.k = x2.size(1);
  p.ldx = x2.size(1);
  p.q = q.data_ptr<int8_t>();
  p.ldq = ldq;
  p.k_pad = k_pad;
  p.scales = scales.data_ptr<float>();
  b.quantize(dt, p);
}

template <class B>
std::tuple<at::Tensor, at::Tensor> quantize_per_token(B& b, const at::Tensor& x) {
  const char* op = "quantize_per_token";
  TORCH_CHECK(x.dim() >= 1, "fastdistill.", op, ": x must have at least 1 dimension (..., K), got a scalar");
  const DType dt = float_dtype(op, "x", x);
  const int64_t k = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor s = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (x2.size(0) == 0) return {q, s};
  if (k == 0) return {q, s.zero_()};
  quantize_into(b, x2, dt, q, k, k, s);
  return {q, s};
}

template <class B>
std::tuple<at::Tensor, at::Tensor> quantize_per_channel(B& b, const at::Tensor& w) {
  const char* op = "quantize_per_channel";
  TORCH_CHECK(w.dim() == 2, "fastdistill.", op, ": w must be 2-D [N, K], got shape ", w.sizes());
  float_dtype(op, "w", w);
  // A load-time op: one host sync for the finiteness check is acceptable here.
  TORCH_CHECK(at::isfinite(w).all().item<bool>(), "fastdistill.", op,
              ": w contains NaN or Inf; cannot quantize a non-finite weight");
  return quantize_per_token(b, w);
}

inline at::Tensor pack_weight(const at::Tensor& w) {
  const char* op = "int8_pack_weight";
  TORCH_CHECK(w.dim() == 2, "fastdistill.", op, ": w_int8 must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kChar, "fastdistill.", op, ": w_int8 must be int8, got ", w.scalar_type());
  const int64_t n = w.size(0), k = w.size(1), kp = padded_k(k);
  at::Tensor out = at::zeros({packed_numel(n, k)}, w.options());
  out.narrow(0, 0, n * kp).view({n, kp}).narrow(1, 0, k).copy_(w);
  return out;
}

inline at::Tensor check_packed(const char* op, const at::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 1, "fastdistill.", op,
              ": w_packed must be a 1-D int8 tensor from fastdistill.int8_pack_weight, got ", packed.scalar_type(),
              " of shape ", packed.sizes());
  TORCH_CHECK(packed.numel() == packed_numel(n, k), "fastdistill.", op, ": w_packed has ", packed.numel(),
              " elements, but a ", packed.device().type(), " packed [N, K] = [", n, ", ", k, "] weight has ",
              packed_numel(n, k), " (pack it with fastdistill.int8_pack_weight on this device)");
  at::Tensor p = packed.contiguous();
  if (!aligned16(p)) p = p.clone();
  return p;
}

inline at::Tensor unpack_weight(const at::Tensor& packed, int64_t n, int64_t k) {
  const char* op = "int8_unpack_weight";
  TORCH_CHECK(n >= 0 && k >= 0, "fastdistill.", op, ": N and K must be >= 0, got ", n, " and ", k);
  const at::Tensor p = check_packed(op, packed, n, k);
  return p.narrow(0, 0, n * padded_k(k)).view({n, padded_k(k)}).narrow(1, 0, k).contiguous();
}

// int8_linear (weight_only = false) and int8_weight_only_linear (true).
template <class B>
at::Tensor linear(B& b, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scales,
                  const std::optional<at::Tensor>& bias_in, bool weight_only) {
  const char* op = weight_only ? "int8_weight_only_linear" : "int8_linear";
  TORCH_CHECK(x.dim() >= 1, "fastdistill.", op, ": x must have at least 1 dimension (..., K), got a scalar");
  const DType dt = float_dtype(op, "x", x);
  TORCH_CHECK(w_scales.dim() == 1, "fastdistill.", op, ": w_scales must be 1-D [N], got shape ", w_scales.sizes());
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat, "fastdistill.", op, ": w_scales must be float32, got ",
              w_scales.scalar_type());
  TORCH_CHECK(w_scales.device() == x.device() && packed.device() == x.device(), "fastdistill.", op,
              ": x, w_packed and w_scales must be on the same device, got ", x.device(), ", ", packed.device(),
              " and ", w_scales.device());
  const int64_t n = w_scales.size(0), k = x.size(-1), kp = padded_k(k);
  const at::Tensor w = check_packed(op, packed, n, k);
  at::Tensor bias;
  if (bias_in.has_value()) {
    float_dtype(op, "bias", *bias_in);
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == n, "fastdistill.", op, ": bias must have shape [N] = [",
                n, "], got ", bias_in->sizes());
    TORCH_CHECK(bias_in->device() == x.device(), "fastdistill.", op, ": bias must be on ", x.device(), ", got ",
                bias_in->device());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out.view(out_shape);
  const at::Tensor ws = w_scales.contiguous();
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  GemvParams p;
  p.w = w.data_ptr<int8_t>();
  p.w_scales = ws.data_ptr<float>();
  p.bias = bias_ptr;
  p.out = out.data_ptr();
  p.m = m;
  p.n = n;
  p.k_pad = kp;
  p.ldo = n;
  p.out_kind = out_kind(dt);
  if (weight_only) {
    if (m > 16 && b.int_mm) {  // decompress + vendor GEMM
      at::Tensor wd = (w.narrow(0, 0, n * kp).view({n, kp}).narrow(1, 0, k).to(at::kFloat) * ws.unsqueeze(1)).to(x.scalar_type());
      out = at::linear(x2, wd, bias.defined() ? std::optional<at::Tensor>(bias.to(x.scalar_type())) : std::nullopt);
      return out.view(out_shape);
    }
    at::Tensor xf = at::empty({m, kp}, x.options().dtype(at::kFloat));
    b.to_f32(dt, x2.data_ptr(), m, k, k, kp, xf.data_ptr<float>());
    p.xf = xf.data_ptr<float>();
    b.gemv(p, true);
    return out.view(out_shape);
  }
  at::Tensor xs = at::empty({m}, x.options().dtype(at::kFloat));
  if (m > 16 && b.int_mm && k == kp && n % 8 == 0) {  // torch._int_mm (cuBLASLt) + fused dequant/bias epilogue
    at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
    quantize_into(b, x2, dt, q, k, k, xs);
    at::Tensor acc = at::_int_mm(q, w.narrow(0, 0, n * k).view({n, k}).t());
    b.epilogue(acc.data_ptr<int32_t>(), m, n, xs.data_ptr<float>(), p.w_scales, bias_ptr, p.out, p.out_kind);
    return out.view(out_shape);
  }
  at::Tensor q = at::empty({m, kp}, x.options().dtype(at::kChar));
  quantize_into(b, x2, dt, q, kp, kp, xs);
  p.qx = q.data_ptr<int8_t>();
  p.x_scales = xs.data_ptr<float>();
  b.gemv(p, false);
  return out.view(out_shape);
}

template <class B>
at::Tensor gemm_s32(B& b, const at::Tensor& x, const at::Tensor& w_in) {
  const char* op = "int8_gemm_s32";
  TORCH_CHECK(x.scalar_type() == at::kChar, "fastdistill.", op, ": x_int8 must be int8, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "fastdistill.", op, ": x_int8 must have at least 1 dimension (..., K), got a scalar");
  TORCH_CHECK(w_in.dim() == 2, "fastdistill.", op, ": w_int8 must be 2-D [N, K], got shape ", w_in.sizes());
  TORCH_CHECK(w_in.scalar_type() == at::kChar, "fastdistill.", op, ": w_int8 must be int8, got ", w_in.scalar_type());
  const int64_t n = w_in.size(0), k = w_in.size(1), kp = padded_k(k);
  TORCH_CHECK(x.size(-1) == k, "fastdistill.", op, ": x_int8 must have K=", k, " columns to match w_int8, got ",
              x.size(-1));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  if (m > 16 && b.int_mm && k % 8 == 0 && n % 8 == 0 && k > 0)
    return at::_int_mm(x2, w_in.contiguous().t()).view(out_shape);
  at::Tensor out = at::zeros({m, n}, x.options().dtype(at::kInt));
  if (m == 0 || n == 0 || k == 0) return out.view(out_shape);
  const at::Tensor w = pack_weight(w_in);  // [N, Kp] zero padded (+ Kp - K bytes)
  at::Tensor xq = x2;
  if (kp != k || !aligned16(x2)) {
    xq = at::zeros({m, kp}, x2.options());
    xq.narrow(1, 0, k).copy_(x2);
  }
  GemvParams p;
  p.qx = xq.data_ptr<int8_t>();
  p.w = w.data_ptr<int8_t>();
  p.out = out.data_ptr();
  p.m = m;
  p.n = n;
  p.k_pad = kp;
  p.ldo = n;
  p.out_kind = OutKind::s32;
  b.gemv(p, false);
  return out.view(out_shape);
}

}  // namespace fastdistill::int8glue

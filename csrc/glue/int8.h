// The torch-facing layer of the int8 ops, shared by the CPU, CUDA and emulator registrations: what the ops
// accept (dtype rules, shapes, devices) and, for GPUs, the allocation, packing and launch sequences. The CPU
// registration (cpu/int8_cpu.cpp) adds its own packed layout and threading.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fastdistill/int8.h"
#include "glue/gpu.h"

namespace fastdistill::int8 {

// Activations, weights and biases are fp32, bf16 or fp16; scales are fp32.
inline DType float_dtype(const char* op, const char* what, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK(false, "fastdistill.", op, ": ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline void check_same_device(const char* op, const char* what, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fastdistill.", op, ": ", what, " must be on x's device ", x.device(),
              ", got ", t.device());
}

inline void check_activations(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "fastdistill.", op, ": x must have at least 1 dimension (..., K), got a scalar");
  float_dtype(op, "x", x);
}

// int8_linear / int8_weight_only_linear: x (..., K), w_scales [N] fp32, bias [N] or None, on x's device. The
// bias's shape is checked by check_bias once the backend has matched N against its packed weight.
inline void check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_packed,
                                const at::Tensor& w_scales, const std::optional<at::Tensor>& bias) {
  check_activations(op, x);
  check_same_device(op, "w_packed", w_packed, x);
  check_same_device(op, "w_scales", w_scales, x);
  TORCH_CHECK(w_scales.dim() == 1, "fastdistill.", op, ": w_scales must be 1-D [N], got shape ", w_scales.sizes());
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat, "fastdistill.", op, ": w_scales must be float32, got ",
              w_scales.scalar_type());
  if (bias.has_value()) {
    check_same_device(op, "bias", *bias, x);
    float_dtype(op, "bias", *bias);
  }
}

// The epilogue's activation by name, one of the op's list (named in the error): int8_linear takes every activation;
// int8_conv2d the ones a CNN fuses (none, relu, relu6: its tests bound its epilogue by fp32 rounding alone, which
// GELU's approximations are not). fastdistill/ops.py's INT8_ACTIVATIONS / CONV_ACTIVATIONS are these lists.
inline constexpr Activation kLinearActivations[] = {Activation::none, Activation::relu, Activation::relu6,
                                                    Activation::gelu, Activation::gelu_tanh};
inline constexpr Activation kConvActivations[] = {Activation::none, Activation::relu, Activation::relu6};

inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::relu: return "relu";
    case Activation::relu6: return "relu6";
    case Activation::gelu: return "gelu";
    case Activation::gelu_tanh: return "gelu_tanh";
    default: return "none";
  }
}

inline Activation parse_activation(const char* op, c10::string_view name,
                                   c10::ArrayRef<Activation> allowed = kLinearActivations) {
  std::string names;
  for (size_t i = 0; i < allowed.size(); ++i) {
    if (name == activation_name(allowed[i])) return allowed[i];
    names += i == 0 ? "'" : i + 1 == allowed.size() ? " or '" : ", '";
    names += activation_name(allowed[i]);
    names += "'";
  }
  TORCH_CHECK(false, "fastdistill.", op, ": activation must be ", names, ", got '", name, "'");
}

// The output dtype: x's when None; fp32, bf16 or fp16.
inline at::ScalarType out_scalar_type(const char* op, const at::Tensor& x, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType t = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "fastdistill.", op,
              ": out_dtype must be float32, bfloat16 or float16, got ", t);
  return t;
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t n) {
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "fastdistill.", op, ": bias must have shape [N] = [", n,
                "], got ", bias->sizes());
}

inline void check_weight_int8(const char* op, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "fastdistill.", op, ": w_int8 must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kChar, "fastdistill.", op, ": w_int8 must be int8, got ", w.scalar_type());
}

inline void check_gemm_s32_inputs(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kChar, "fastdistill.", op, ": x_int8 must be int8, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "fastdistill.", op, ": x_int8 must have at least 1 dimension (..., K), got a scalar");
  check_weight_int8(op, w);
  check_same_device(op, "w_int8", w, x);
  TORCH_CHECK(x.size(-1) == w.size(1), "fastdistill.", op, ": x_int8 must have K=", w.size(1),
              " columns to match the weight, got ", x.size(-1));
}

inline void check_quantize_per_channel(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "fastdistill.quantize_per_channel: w must be 2-D [N, K], got shape ", w.sizes());
  float_dtype("quantize_per_channel", "w", w);
}

// x (..., K) -> [M, K] rows (M the product of the leading dims, also when K == 0), and the output shape (..., N).
inline at::Tensor as_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return x.reshape({m, x.size(-1)});
}

inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = n;
  return s;
}

// ---- GPU (CUDA and the emulator) ----
inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Quantises rows of a contiguous [m, k] float tensor into [m, ldq] int8 (zero padded to k_pad).
inline void quantize_into(const GpuBackend& b, const at::Tensor& x2, DType dt, at::Tensor& q, int64_t ldq,
                          int64_t k_pad, at::Tensor& scales) {
  QuantParams p;
  p.dtype = dt;
  p.x = x2.data_ptr();
  p.rows = x2.size(0);
  p.k = x2.size(1);
  p.ldx = x2.size(1);
  p.q = q.data_ptr<int8_t>();
  p.ldq = ldq;
  p.k_pad = k_pad;
  p.scales = scales.data_ptr<float>();
  gpu::quantize_rows(p, b.stream);
  b.launched();
}

inline std::tuple<at::Tensor, at::Tensor> quantize_per_token_gpu(const GpuBackend& b, const at::Tensor& x) {
  check_activations("quantize_per_token", x);
  const DType dt = float_dtype("quantize_per_token", "x", x);
  const int64_t k = x.size(-1);
  const at::Tensor x2 = as_rows(x).contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor s = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (x2.size(0) == 0) return {q, s};
  if (k == 0) return {q, s.zero_()};
  quantize_into(b, x2, dt, q, k, k, s);
  return {q, s};
}

inline std::tuple<at::Tensor, at::Tensor> quantize_per_channel_gpu(const GpuBackend& b, const at::Tensor& w) {
  check_quantize_per_channel(w);
  // A load-time op: one host sync for the finiteness check is acceptable here.
  TORCH_CHECK(at::isfinite(w).all().item<bool>(),
              "fastdistill.quantize_per_channel: w contains NaN or Inf; cannot quantize a non-finite weight");
  return quantize_per_token_gpu(b, w);
}

inline at::Tensor pack_weight_gpu(const at::Tensor& w) {
  check_weight_int8("int8_pack_weight", w);
  const int64_t n = w.size(0), k = w.size(1), kp = padded_k(k);
  at::Tensor out = at::zeros({packed_numel(n, k)}, w.options());
  out.narrow(0, 0, n * kp).view({n, kp}).narrow(1, 0, k).copy_(w);
  return out;
}

inline at::Tensor check_packed_gpu(const char* op, const at::Tensor& packed, int64_t n, int64_t k) {
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

inline at::Tensor unpack_weight_gpu(const at::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(n >= 0 && k >= 0, "fastdistill.int8_unpack_weight: N and K must be >= 0, got ", n, " and ", k);
  const at::Tensor p = check_packed_gpu("int8_unpack_weight", packed, n, k);
  return p.narrow(0, 0, n * padded_k(k)).view({n, padded_k(k)}).narrow(1, 0, k).contiguous();
}

// int8_linear (weight_only = false; with its epilogue's activation and output dtype) and int8_weight_only_linear
// (true; act none, the output in x's dtype).
inline at::Tensor linear_gpu(const GpuBackend& b, const at::Tensor& x, const at::Tensor& packed,
                             const at::Tensor& w_scales, const std::optional<at::Tensor>& bias_in, bool weight_only,
                             Activation act = Activation::none, std::optional<at::ScalarType> out_dtype = std::nullopt) {
  const char* op = weight_only ? "int8_weight_only_linear" : "int8_linear";
  check_linear_inputs(op, x, packed, w_scales, bias_in);
  const DType dt = float_dtype(op, "x", x);
  const at::ScalarType ot = out_scalar_type(op, x, out_dtype);
  const int64_t n = w_scales.size(0), k = x.size(-1), kp = padded_k(k);
  const at::Tensor w = check_packed_gpu(op, packed, n, k);
  check_bias(op, bias_in, n);
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const at::Tensor x2 = as_rows(x).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor out = at::empty({m, n}, x.options().dtype(ot));
  if (m == 0 || n == 0) return out.view(out_shape(x, n));
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
  p.out_kind = out_kind(float_dtype(op, "out", out));
  p.act = act;
  if (weight_only) {
    if (m > 16 && b.vendor_gemm) {  // dequantise + vendor GEMM
      at::Tensor wd = (w.narrow(0, 0, n * kp).view({n, kp}).narrow(1, 0, k).to(at::kFloat) * ws.unsqueeze(1))
                          .to(x.scalar_type());
      out = at::linear(x2, wd, bias.defined() ? std::optional<at::Tensor>(bias.to(x.scalar_type())) : std::nullopt);
      return out.view(out_shape(x, n));
    }
    at::Tensor xf = at::empty({m, kp}, x.options().dtype(at::kFloat));
    gpu::to_f32_padded(dt, x2.data_ptr(), m, k, k, kp, xf.data_ptr<float>(), b.stream);
    b.launched();
    p.xf = xf.data_ptr<float>();
    gpu::gemv(p, true, b.stream);
    b.launched();
    return out.view(out_shape(x, n));
  }
  at::Tensor xs = at::empty({m}, x.options().dtype(at::kFloat));
  if (m > 16 && b.vendor_gemm && k == kp && n % 8 == 0) {  // torch._int_mm (cuBLASLt) + our dequant/bias epilogue
    at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
    quantize_into(b, x2, dt, q, k, k, xs);
    at::Tensor acc = at::_int_mm(q, w.narrow(0, 0, n * k).view({n, k}).t());
    gpu::dequant_epilogue(acc.data_ptr<int32_t>(), m, n, xs.data_ptr<float>(), p.w_scales, bias_ptr, act, p.out,
                          p.out_kind, b.max_blocks, b.stream);
    b.launched();
    return out.view(out_shape(x, n));
  }
  at::Tensor q = at::empty({m, kp}, x.options().dtype(at::kChar));
  quantize_into(b, x2, dt, q, kp, kp, xs);
  p.qx = q.data_ptr<int8_t>();
  p.x_scales = xs.data_ptr<float>();
  gpu::gemv(p, false, b.stream);
  b.launched();
  return out.view(out_shape(x, n));
}

inline at::Tensor gemm_s32_gpu(const GpuBackend& b, const at::Tensor& x, const at::Tensor& w_in) {
  check_gemm_s32_inputs("int8_gemm_s32", x, w_in);
  const int64_t n = w_in.size(0), k = w_in.size(1), kp = padded_k(k);
  const at::Tensor x2 = as_rows(x).contiguous();
  const int64_t m = x2.size(0);
  if (m > 16 && b.vendor_gemm && k % 8 == 0 && n % 8 == 0 && k > 0)
    return at::_int_mm(x2, w_in.contiguous().t()).view(out_shape(x, n));
  at::Tensor out = at::zeros({m, n}, x.options().dtype(at::kInt));
  if (m == 0 || n == 0 || k == 0) return out.view(out_shape(x, n));
  const at::Tensor w = pack_weight_gpu(w_in);  // [N, Kp] zero padded (+ Kp - K bytes)
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
  gpu::gemv(p, false, b.stream);
  b.launched();
  return out.view(out_shape(x, n));
}

}  // namespace fastdistill::int8

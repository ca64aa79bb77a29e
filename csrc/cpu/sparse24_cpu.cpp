// Torch glue for the 2:4 sparse CPU kernels: checks, activation staging (fp32 / int8 quantized,
// zero-padded rows), ISA dispatch and at::parallel_for over output columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/cpu_isa.h"
#include "cpu/sparse24_kernels.h"

namespace fastdistill::cpu {
namespace {

using namespace sparse24;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Shared checks; returns K.
int64_t check_common(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a 0-dim tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % 4 == 0, op, ": 2:4 sparsity needs K (x.size(-1)) to be a multiple of 4, got K=", K);
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.sizes());
  const int64_t N = values.size(0);
  TORCH_CHECK(values.size(1) == K / 2, op, ": values must be [N, K/2] = [", N, ", ", K / 2,
              "] to match x with K=", K, ", got ", values.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kByte, op, ": meta must be uint8, got ", meta.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 7) / 8, op,
              ": meta must be [N, ceil(K/8)] = [", N, ", ", (K + 7) / 8, "], got ", meta.sizes());
  for (const at::Tensor* t : {&x, &values, &meta})
    TORCH_CHECK(t->device().is_cpu(), op, ": all tensors must be on the CPU, got one on ", t->device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N] = [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->is_floating_point(), op, ": bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be on the CPU, got ", bias->device());
  }
  return K;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  auto s = x.sizes().vec();
  s.back() = N;
  return s;
}

// Columns per parallel task: tiles of 4, enough work per task to amortise the fork.
int64_t column_grain(int64_t M, int64_t K, int64_t N) {
  const int64_t work_per_col = std::max<int64_t>(1, M * K);
  const int64_t cols = std::max<int64_t>(4, round_up((int64_t(1) << 16) / work_per_col, 4));
  return std::min(cols, round_up(std::max<int64_t>(N, 1), 4));
}

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "fastdistill.sparse24_linear";
  const int64_t K = check_common(op, x, values, meta, bias);
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16, op,
              ": values must be float32 or bfloat16 (int8 values go through sparse24_int8_linear), got ",
              values.scalar_type());
  const int64_t N = values.size(0);
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  const auto vals = values.contiguous();
  const auto met = meta.contiguous();
  // Activations as fp32 rows padded with zeros to a multiple of 32 columns.
  at::Tensor x2 = x.reshape({M, K});
  at::Tensor xf;
  int64_t ldx = K;
  if (x2.scalar_type() == at::kFloat && x2.is_contiguous() && K % 32 == 0) {
    xf = x2;
  } else {
    ldx = round_up(std::max<int64_t>(K, 1), 32);
    xf = at::zeros({M, ldx}, x.options().dtype(at::kFloat));
    xf.narrow(1, 0, K).copy_(x2);
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (bias.has_value()) out.copy_(bias->to(at::kFloat).unsqueeze(0).expand({M, N}));
  else out.zero_();
  if (M > 0 && N > 0 && K > 0) {
    FloatParams p;
    p.x = xf.data_ptr<float>();
    p.ldx = ldx;
    p.values = vals.data_ptr();
    p.values_bf16 = vals.scalar_type() == at::kBFloat16;
    p.meta = met.data_ptr<uint8_t>();
    p.M = M, p.N = N, p.K = K;
    p.out = out.data_ptr<float>();
    p.ldo = N;
    const CpuIsa isa = active_isa();
    at::Tensor xt;
    if (isa == CpuIsa::avx512 && M >= kXtMinM) {  // activations transposed per 64-row block
      const int64_t mp = round_up(M, kXtRows);
      xt = at::zeros({mp, ldx}, xf.options());
      xt.narrow(0, 0, M).copy_(xf);
      xt = xt.view({mp / kXtRows, kXtRows, ldx}).transpose(1, 2).contiguous();
      p.xt = xt.data_ptr<float>();
    }
    const int64_t ntiles = (N + 3) / 4;
    at::parallel_for(0, ntiles, column_grain(M, K, N) / 4, [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4);
      if (isa == CpuIsa::avx512) sparse24::avx512::float_linear(p, n0, n1);
      else if (isa == CpuIsa::avx2) sparse24::avx2::float_linear(p, n0, n1);
      else sparse24::scalar::float_linear(p, n0, n1);
    });
  }
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  return out.view(out_shape(x, N));
}

at::Tensor sparse24_int8_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                    const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "fastdistill.sparse24_int8_linear";
  const int64_t K = check_common(op, x, values, meta, bias);
  TORCH_CHECK(values.scalar_type() == at::kChar, op, ": values must be int8, got ", values.scalar_type());
  const int64_t N = values.size(0);
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.dim() == 1 && w_scales.size(0) == N, op,
              ": w_scales must be float32 [N] = [", N, "], got ", w_scales.scalar_type(), " ", w_scales.sizes());
  TORCH_CHECK(w_scales.device().is_cpu(), op, ": w_scales must be on the CPU, got ", w_scales.device());
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  const auto vals = values.contiguous();
  const auto met = meta.contiguous();
  const auto ws = w_scales.contiguous();
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  // Per-token symmetric quantization into zero-padded int8 rows.
  const at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  const int64_t ldx = round_up(std::max<int64_t>(K, 1), kXPad);
  at::Tensor xq = at::zeros({M, ldx}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M}, x.options().dtype(at::kFloat));
  {
    const float* xp = xf.data_ptr<float>();
    int8_t* qp = xq.data_ptr<int8_t>();
    float* sp = xs.data_ptr<float>();
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = xp + r * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
        const float s = amax / 127.f;
        sp[r] = s;
        int8_t* q = qp + r * ldx;
        if (s == 0.f) continue;  // all-zero row: q = 0, and the output is the bias
        for (int64_t k = 0; k < K; ++k) {
          const float v = std::nearbyint(row[k] / s);  // round half to even (default FP env)
          q[k] = int8_t(std::min(127.f, std::max(-127.f, v)));
        }
      }
    });
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0) {
    Int8Params p;
    p.xq = xq.data_ptr<int8_t>();
    p.ldx = ldx;
    p.x_scales = xs.data_ptr<float>();
    p.values = vals.data_ptr<int8_t>();
    p.meta = met.data_ptr<uint8_t>();
    p.w_scales = ws.data_ptr<float>();
    p.bias = bias.has_value() ? bf.data_ptr<float>() : nullptr;
    p.M = M, p.N = N, p.K = K;
    p.out = out.data_ptr<float>();
    p.ldo = N;
    const CpuIsa isa = active_isa();
    const CpuFeatures& f = cpu_features();
    const bool use512 = isa == CpuIsa::avx512 && f.avx512vnni && f.avx512vbmi;
    const int64_t ntiles = (N + 3) / 4;
    at::parallel_for(0, ntiles, column_grain(M, K, N) / 4, [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4);
      if (use512) sparse24::avx512::int8_linear(p, n0, n1);
      else if (isa != CpuIsa::scalar) sparse24::avx2::int8_linear(p, n0, n1);
      else sparse24::scalar::int8_linear(p, n0, n1);
    });
  }
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  return out.view(out_shape(x, N));
}

std::tuple<at::Tensor, at::Tensor> sparse24_pack_cpu(const at::Tensor& values, const at::Tensor& meta) {
  constexpr const char* op = "fastdistill.sparse24_pack";
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16 ||
                  values.scalar_type() == at::kChar,
              op, ": values must be float32, bfloat16 or int8, got ", values.scalar_type());
  const int64_t N = values.size(0), K = 2 * values.size(1);
  TORCH_CHECK(K % 4 == 0, op, ": values.size(1) = K/2 must be even (K a multiple of 4), got ", values.size(1));
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 7) / 8,
              op, ": meta must be uint8 [N, ceil(K/8)] = [", N, ", ", (K + 7) / 8, "], got ", meta.scalar_type(),
              " ", meta.sizes());
  // The CPU kernels read the canonical layout: packing is a contiguous copy.
  return {values.contiguous().clone(), meta.contiguous().clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("sparse24_pack", &sparse24_pack_cpu);
  m.impl("sparse24_linear", &sparse24_linear_cpu);
  m.impl("sparse24_int8_linear", &sparse24_int8_linear_cpu);
}

}  // namespace fastdistill::cpu

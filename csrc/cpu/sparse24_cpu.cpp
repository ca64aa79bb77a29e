// Torch glue for the 2:4 sparse CPU kernels: checks, activation staging (fp32 / int8 quantized,
// zero-padded rows), ISA dispatch and at::parallel_for over output columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <memory>
#include <thread>

#include "cpu/cpu_isa.h"
#include "cpu/int8_kernels.h"
#include "cpu/sparse24_kernels.h"
#include "cpu/task_runner.h"

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

// Column tasks: multiples of 4 columns, sized so that one task streams about kTaskBytes of weights
// (or does about kTaskWork multiply-adds at large M), with at least a few tasks per thread.
constexpr int64_t kTaskBytes = 256 << 10;
constexpr int64_t kTaskWork = int64_t(1) << 22;
int64_t task_columns(int64_t M, int64_t K, int64_t N, int64_t bytes_per_col, int64_t nthreads) {
  int64_t cols = std::max(kTaskBytes / std::max<int64_t>(bytes_per_col, 1),
                          kTaskWork / std::max<int64_t>(M * K / 2, 1));
  cols = std::min(cols, N / std::max<int64_t>(4 * nthreads, 1));  // >= 4 tasks per thread
  return std::max<int64_t>(4, cols / 4 * 4);
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
  // The output is initialised (bias or 0) column block by column block inside the tasks: a separate
  // ATen fill of a large output would be one more fork/join.
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  if (M > 0 && N > 0) {
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
    if (isa == CpuIsa::avx512 && M >= kXtMinM && K > 0) {
      // Activations transposed per 64-row block: xt[mb][k][r] = x[64 mb + r][k], zero-padded.
      const int64_t nmb = (M + kXtRows - 1) / kXtRows;
      xt = at::empty({nmb, ldx, kXtRows}, xf.options());
      float* xtp = xt.data_ptr<float>();
      const float* xp = p.x;
      constexpr int64_t kcb = 256;
      const int64_t nkb = (ldx + kcb - 1) / kcb;
      run_dynamic(nmb * nkb, [&](int64_t t) {
        const int64_t mb = t / nkb, k0 = (t % nkb) * kcb, k1 = std::min(ldx, k0 + kcb);
        sparse24::avx512::transpose_to_xt(xp + mb * kXtRows * ldx, ldx, std::min(kXtRows, M - mb * kXtRows), k0, k1,
                                          xtp + mb * ldx * kXtRows);
      });
      p.xt = xtp;
    }
    // Small M: column tasks over all rows (each weight byte streamed once). Large M (xt): tasks of
    // (64-row block, kXtCols columns), column-block-major so that concurrent tasks share the weight
    // block in L3; a task reuses each activation slice across all its columns. Task boundaries
    // depend only on the shape, and each output element is computed by one task.
    const int64_t cols = p.xt ? kXtCols
                              : task_columns(M, K, N, (K / 2) * vals.element_size() + (K + 7) / 8, at::get_num_threads());
    const int64_t mrows = p.xt ? kXtRows : M;
    const int64_t nmb = (M + mrows - 1) / mrows;
    run_dynamic(nmb * ((N + cols - 1) / cols), [&](int64_t t) {
      const int64_t mb = t % nmb;
      const int64_t n0 = (t / nmb) * cols, n1 = std::min(N, n0 + cols);
      const int64_t m0 = mb * mrows, m1 = std::min(M, m0 + mrows);
      for (int64_t m = m0; m < m1; ++m) {
        float* o = p.out + m * p.ldo;
        for (int64_t n = n0; n < n1; ++n) o[n] = bp ? bp[n] : 0.f;
      }
      if (K == 0) return;
      FloatParams q = p;
      q.M = m1 - m0;
      q.x = p.x + m0 * p.ldx;
      q.out = p.out + m0 * p.ldo;
      if (p.xt) q.xt = p.xt + mb * p.ldx * kXtRows;
      if (isa == CpuIsa::avx512) sparse24::avx512::float_linear(q, n0, n1);
      else if (isa == CpuIsa::avx2) sparse24::avx2::float_linear(q, n0, n1);
      else sparse24::scalar::float_linear(q, n0, n1);
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
  at::Tensor xq = at::empty({M, ldx}, x.options().dtype(at::kChar));  // padding written by the quantiser
  at::Tensor xs = at::empty({M}, x.options().dtype(at::kFloat));
  {
    // The int8 family's vectorised row quantiser (same numerics: s = amax / 127, rne(x / s), clamp).
    int8::QuantParams qp;
    qp.dtype = DType::f32;
    qp.x = xf.data_ptr<float>();
    qp.ldx = K;
    qp.k = K;
    qp.k_pad = ldx;
    qp.q = xq.data_ptr<int8_t>();
    qp.ldq = ldx;
    qp.scales = xs.data_ptr<float>();
    qp.xor_mask = 0;  // the sparse kernels take s8 activations
    const CpuIsa qisa = active_isa();
    const int64_t rows_per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
    run_dynamic((M + rows_per_task - 1) / rows_per_task, [&](int64_t t) {
      const int64_t r0 = t * rows_per_task, r1 = std::min(M, r0 + rows_per_task);
#if defined(__x86_64__)
      if (qisa == CpuIsa::avx512) return int8::avx512::quantize_rows(qp, r0, r1);
      if (qisa == CpuIsa::avx2) return int8::avx2::quantize_rows(qp, r0, r1);
#endif
      int8::scalar::quantize_rows(qp, r0, r1);
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
    const int64_t cols = task_columns(M, K, N, K / 2 + (K + 7) / 8, at::get_num_threads());
    run_dynamic((N + cols - 1) / cols, [&](int64_t t) {
      const int64_t n0 = t * cols, n1 = std::min(N, n0 + cols);
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

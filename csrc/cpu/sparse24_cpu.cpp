// CPU registration of the 2:4 ops: activation staging (fp32, or int8 quantized through the int8 family's table),
// zero-padded rows, the task schedule over output columns and the kernel table of the ISA level in force. What
// the ops accept is glue/sparse24.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/int8_kernels.h"
#include "cpu/sparse24_kernels.h"
#include "cpu/task_runner.h"
#include "glue/sparse24.h"

namespace fastdistill::cpu::sparse24 {
namespace {

using fastdistill::sparse24::round_up;
using fastdistill::int8::out_shape;

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
  const int64_t K = fastdistill::sparse24::check_linear_inputs("sparse24_linear", x, values, meta, nullptr, bias);
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
    p.values_dtype = fastdistill::int8::float_dtype("sparse24_linear", "values", vals);
    p.meta = met.data_ptr<uint8_t>();
    p.M = M, p.N = N, p.K = K;
    p.out = out.data_ptr<float>();
    p.ldo = N;
    const Sparse24Kernels& kern = sparse24_kernels();
    at::Tensor xt;
    if (kern.transpose_to_xt != nullptr && M >= kXtMinM && K > 0) {
      // Activations transposed per 64-row block: xt[mb][k][r] = x[64 mb + r][k], zero-padded.
      const int64_t nmb = (M + kXtRows - 1) / kXtRows;
      xt = at::empty({nmb, ldx, kXtRows}, xf.options());
      float* xtp = xt.data_ptr<float>();
      const float* xp = p.x;
      constexpr int64_t kcb = 256;
      const int64_t nkb = (ldx + kcb - 1) / kcb;
      run_dynamic(nmb * nkb, double(M) * double(ldx), [&](int64_t t) {
        const int64_t mb = t / nkb, k0 = (t % nkb) * kcb, k1 = std::min(ldx, k0 + kcb);
        kern.transpose_to_xt(xp + mb * kXtRows * ldx, ldx, std::min(kXtRows, M - mb * kXtRows), k0, k1,
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
    run_dynamic(nmb * ((N + cols - 1) / cols), 4.0 * double(M) * double(N) * double(K), [&](int64_t t) {
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
      kern.float_linear(q, n0, n1);
    });
  }
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  return out.view(out_shape(x, N));
}

// The int8 decompress route: from this many rows, each task unpacks a 64-column panel of the 2:4 weight into a
// per-thread scratch panel in the int8 family's packed layout and runs the dense int8 micro-kernel
// (Int8Kernels::gemm_s8_panel) on it for its rows; the dense weight never exists as a whole. The integer sums and
// the epilogue are the 2:4 kernels', so the result is the same bit for bit. Chosen by measurement: the route
// against the 2:4 kernels, one thread (thread CPU time, the machine being shared), M = 8..128 at K x N = 4096 x
// 4096, 768 x 3072, 3072 x 768 on AMD EPYC Zen 4: from M = 48 the route wins on every shape (1.09-1.28x); at
// M = 32 it is even on 4096 x 4096, 1.25x on 768 x 3072, 0.97x on 3072 x 768; at M = 24 and below the 2:4
// kernel wins or ties. avx2 and scalar: the route wins from M = 24. Not measured on Intel.
constexpr int64_t kInt8DenseRouteMinRows = 32;

// Rows [m0, m1) x panel columns [n0, n0 + cols) of the route; p.xq holds the quantized rows (u8 = s8 + 128 where the
// int8 table's GEMM takes them). The scratch panel is per thread and kept (64 x K bytes, the largest K seen): a
// thread-local buffer needs no thread numbering, which nested parallel regions make unreliable.
void int8_dense_route_task(const Int8Params& p, const int8::Int8Kernels& dense, int64_t m0, int64_t m1, int64_t n0,
                           int64_t cols) {
  thread_local std::vector<int8_t> scratch;
  if (int64_t(scratch.size()) < int8::kPanelCols * p.K) scratch.resize(size_t(int8::kPanelCols * p.K));
  int8_t* panel = scratch.data();
  const Sparse24Kernels& kern = sparse24_kernels();
  alignas(64) int32_t wsum[int8::kPanelCols];
  alignas(64) int32_t c[int8::kTileRows * int8::kPanelCols];
  kern.unpack_int8_panel(p.values, p.meta, p.K, n0, cols, panel, wsum);
  const int nblk = int((cols + int8::kNB - 1) / int8::kNB);
  for (int64_t mc = m0; mc < m1; mc += int8::kTileRows) {
    const int64_t rows = std::min(int8::kTileRows, m1 - mc);
    dense.gemm_s8_panel(p.xq + mc * p.ldx, p.ldx, panel, p.K, nblk, rows, c);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t m = mc + i;
      int32_t* ci = c + i * int8::kPanelCols;
      if (dense.u8_activations)
        for (int64_t j = 0; j < cols; ++j) ci[j] -= 128 * wsum[j];
      int8_epilogue_row(ci, cols, p.x_scales[m], p.w_scales, p.bias, n0, p.out + m * p.ldo + n0);
    }
  }
}

at::Tensor sparse24_int8_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                    const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias) {
  const int64_t K =
      fastdistill::sparse24::check_linear_inputs("sparse24_int8_linear", x, values, meta, &w_scales, bias);
  const int64_t N = values.size(0);
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  const auto vals = values.contiguous();
  const auto met = meta.contiguous();
  const auto ws = w_scales.contiguous();
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  // Per-token symmetric quantization into zero-padded int8 rows.
  const at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  const int64_t ldx = round_up(std::max<int64_t>(K, 1), kXPad);
  const int8::Int8Kernels& dense = int8::int8_kernels_for_rows(M);
  const bool dense_route = M >= kInt8DenseRouteMinRows && K <= int8::kMaxK;
  const bool shifted = dense_route ? dense.u8_activations : sparse24_kernels().int8_u8_activations;
  at::Tensor xq = at::empty({M, ldx}, x.options().dtype(at::kChar));  // padding written by the quantiser
  at::Tensor xs = at::empty({M}, x.options().dtype(at::kFloat));
  {
    // The int8 family's row quantiser (same numerics as quantize_per_token), into s8 or u8 = s8 + 128, as the
    // kernel that takes them (the 2:4 table's int8_linear, or the route's int8 GEMM) wants.
    fastdistill::int8::QuantParams qp;
    qp.dtype = DType::f32;
    qp.x = xf.data_ptr<float>();
    qp.rows = M;
    qp.ldx = qp.k = K;
    qp.k_pad = qp.ldq = ldx;
    qp.q = xq.data_ptr<int8_t>();
    qp.scales = xs.data_ptr<float>();
    qp.xor_mask = shifted ? 0x80 : 0;
    const auto quantize_rows = dense.quantize_rows;
    const int64_t rows_per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
    run_dynamic((M + rows_per_task - 1) / rows_per_task, double(M) * double(K), [&](int64_t t) {
      const int64_t r0 = t * rows_per_task;
      quantize_rows(qp, r0, std::min(M, r0 + rows_per_task));
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
    const int64_t nthreads = at::get_num_threads();
    if (dense_route) {
      // Tasks: (64-column panel) x (row chunk); the rows are split only when there are too few panels to keep
      // every thread busy, since each task unpacks its panel once.
      const int64_t panels = (N + int8::kPanelCols - 1) / int8::kPanelCols;
      const int64_t row_tasks = std::min((4 * nthreads + panels - 1) / panels, (M + int8::kTileRows - 1) / int8::kTileRows);
      const int64_t chunk = round_up((M + row_tasks - 1) / row_tasks, int8::kTileRows);
      const int64_t chunks = (M + chunk - 1) / chunk;
      run_dynamic(panels * chunks, 2.0 * double(M) * double(N) * double(K), [&](int64_t t) {
        const int64_t n0 = (t / chunks) * int8::kPanelCols, m0 = (t % chunks) * chunk;
        int8_dense_route_task(p, dense, m0, std::min(M, m0 + chunk), n0, std::min(int8::kPanelCols, N - n0));
      });
    } else {
      const auto int8_linear = sparse24_kernels().int8_linear;
      const int64_t cols = task_columns(M, K, N, K / 2 + (K + 7) / 8, nthreads);
      run_dynamic((N + cols - 1) / cols, 2.0 * double(M) * double(N) * double(K), [&](int64_t t) {
        const int64_t n0 = t * cols, n1 = std::min(N, n0 + cols);
        int8_linear(p, n0, n1);
      });
    }
  }
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  return out.view(out_shape(x, N));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("sparse24_pack", &fastdistill::sparse24::pack);
  m.impl("sparse24_linear", &sparse24_linear_cpu);
  m.impl("sparse24_int8_linear", &sparse24_int8_linear_cpu);
}

}  // namespace fastdistill::cpu::sparse24

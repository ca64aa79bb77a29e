// CPU registration of the distillation-loss ops: allocation, threading and the row schedule over the kernel table
// (cpu/kd_loss_kernels.h). What the ops accept is glue/kd_loss.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/kd_loss_kernels.h"
#include "cpu/reusable_buffer.h"
#include "glue/kd_loss.h"

namespace fastdistill::cpu::kd {
namespace {

// Column chunking. Rows are split only when there are few of them, and by a rule that depends on
// the shape alone, so results are identical for any thread count.
constexpr int64_t kFewRows = 64, kSplitAbove = 32768, kChunk = 16384;

int64_t column_chunk(const KdLossParams& p) {
  return (p.rows < kFewRows && p.vocab > kSplitAbove) ? kChunk : p.vocab;
}

int64_t grain_rows(const KdLossParams& p, int64_t chunk) { return std::max<int64_t>(1, 32768 / chunk); }

// at::parallel_for over [0, n) with denormals flushed on every worker (see FlushDenormals): a masked
// vocabulary's -inf logits would otherwise cost a microcode assist per element.
template <class F>
void parallel_tasks(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    FlushDenormals flush;
    f(i0, i1);
  });
}

// Finishes one row from its merged softmax state (and, for JSD, the second-pass sums).
void finish_row(const KdLossParams& p, int64_t r, KdRowGrad lse, float sum_p, float sum_q, const KdPartial& st,
                float* loss, float* stats) {
  float div = 0.f;
  if (p.divergence == Divergence::jsd) {
    div = p.beta * sum_p + (1.f - p.beta) * sum_q;
    lse.aux = sum_q;
  } else {
    div = kd_kl_from_state(st, lse, p.divergence, p.inv_temperature);
    kd_set_gradient_stats(st, p.divergence, lse);
  }
  float row = p.soft_coef != 0.f ? p.soft_coef * div : 0.f;
  if (p.has_hard() && p.counted(r)) row += p.hard_weight * ((lse.m_s - kd_student_logit(p, r, p.labels[r])) + lse.lz_h);
  loss[r] = p.counted(r) ? row : 0.f;
  if (!p.has_hard()) lse.lz_h = 0.f;
  kd_store_stats(lse, stats + r * kNumStats);
}

// The backward's per-row constants for d loss / d row_loss = g.
KdRowGrad row_grad(const KdLossParams& p, int64_t r, const float* stats, float g) {
  KdRowGrad rg = kd_load_stats(stats + r * kNumStats);
  rg.soft = g * p.soft_coef * p.inv_temperature;
  rg.hard = p.has_hard() ? g * p.hard_weight : 0.f;
  rg.label = p.has_hard() ? p.labels[r] : -1;
  return rg;
}

// Gradient of row r, columns [c0, c1), into `out` (contiguous [rows, vocab]); g is d loss / d row_loss.
// Ignored rows get zeros.
void backward_row(const KdLossParams& p, const KdKernels& k, int64_t r, int64_t c0, int64_t c1, const float* stats,
                  float g, void* out) {
  if (!p.counted(r)) {
    const int64_t elem = p.student_dtype == DType::f32 ? 4 : 2;
    std::memset(static_cast<char*>(out) + (r * p.vocab + c0) * elem, 0, (c1 - c0) * elem);
    return;
  }
  k.backward(p, r, c0, c1, row_grad(p, r, stats, g), out);
}

// backward_row of a whole row from what k.stats_cached (forward / reverse KL) or k.jsd (JSD) left in `cache`.
void backward_row_cached(const KdLossParams& p, const KdKernels& k, int64_t r, const float* stats, float g,
                         const float* cache, void* out) {
  if (!p.counted(r)) return backward_row(p, k, r, 0, p.vocab, stats, g, out);  // zeros
  k.backward_cached(p, r, row_grad(p, r, stats, g), cache, out);
}

// Every row's gradient; g[r * g_stride] is row r's d loss / d row_loss (g_stride 0: one for all).
void backward_all(const KdLossParams& p, const KdKernels& k, const float* stats, const float* g, int64_t g_stride,
                  void* out) {
  const int64_t chunk = column_chunk(p), nchunks = (p.vocab + chunk - 1) / chunk;
  parallel_tasks(p.rows * nchunks, chunk == p.vocab ? grain_rows(p, chunk) : 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / nchunks, c0 = (i % nchunks) * chunk;
      backward_row(p, k, r, c0, std::min(p.vocab, c0 + chunk), stats, g[r * g_stride], out);
    }
  });
}

// Every row's state over all its columns: (row, column chunk) tasks, merged per row in chunk order (the chunks
// are a rule of the shape alone, so the result does not depend on the thread count).
std::vector<KdPartial> row_states(const KdLossParams& p, const KdKernels& k) {
  const int64_t chunk = column_chunk(p), nchunks = (p.vocab + chunk - 1) / chunk, tasks = p.rows * nchunks;
  std::vector<KdPartial> parts(tasks);
  parallel_tasks(tasks, nchunks == 1 ? grain_rows(p, chunk) : 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c0 = (i % nchunks) * chunk;
      parts[i] = k.stats(p, i / nchunks, c0, std::min(p.vocab, c0 + chunk));
    }
  });
  if (nchunks == 1) return parts;
  const bool teacher_primary = kd_teacher_primary(p.divergence);
  std::vector<KdPartial> merged(p.rows);
  for (int64_t r = 0; r < p.rows; ++r) {
    KdPartial st = parts[r * nchunks];
    for (int64_t c = 1; c < nchunks; ++c) st = kd_merge(st, parts[r * nchunks + c], p.inv_temperature, teacher_primary);
    merged[r] = st;
  }
  return merged;
}

// JSD's two sums (p (log p - log M), q (log q - log M)) of every row into sums [rows, 2], given each row's
// logsumexps lse_of(row); chunked as row_states and summed in chunk order.
template <class Lse>
void row_jsd_sums(const KdLossParams& p, const KdKernels& k, const Lse& lse_of, float* sums) {
  const int64_t chunk = column_chunk(p), nchunks = (p.vocab + chunk - 1) / chunk, tasks = p.rows * nchunks;
  std::vector<float> parts(tasks * 2);
  parallel_tasks(tasks, nchunks == 1 ? grain_rows(p, chunk) : 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c0 = (i % nchunks) * chunk;
      k.jsd(p, i / nchunks, c0, std::min(p.vocab, c0 + chunk), lse_of(i / nchunks), &parts[2 * i], &parts[2 * i + 1],
            nullptr);
    }
  });
  for (int64_t r = 0; r < p.rows; ++r) {
    float sum_p = 0.f, sum_q = 0.f;
    for (int64_t c = 0; c < nchunks; ++c) {
      sum_p += parts[2 * (r * nchunks + c)];
      sum_q += parts[2 * (r * nchunks + c) + 1];
    }
    sums[2 * r] = sum_p;
    sums[2 * r + 1] = sum_q;
  }
}

// Loss rows and statistics; with `grad` also the gradient for d loss / d row_loss = *grad_weight (one
// constant for every row). Whole rows are one task each, so the gradient pass re-reads a row while it is
// still in cache: 2 reads + 1 write of logits-sized memory instead of the 4 reads + 1 write of separate
// forward and backward calls.
void forward_rows(const KdLossParams& p, float* loss, float* stats, void* grad, const float* grad_weight) {
  const KdKernels& k = kd_kernels();
  const bool jsd = p.divergence == Divergence::jsd;
  const int64_t chunk = column_chunk(p);
  if (chunk == p.vocab) {  // one task per row: both JSD passes (and the gradient) run while the row is in cache
    // KL gradients come from the statistics pass's cache (exponentials; for reverse KL also the log
    // ratios), JSD gradients from its second pass's q and log-ratio: no exp or log, no logits re-read.
    const bool cached = grad && !p.separate_hard_lse();
    parallel_tasks(p.rows, grain_rows(p, chunk), [&](int64_t r0, int64_t r1) {
      std::vector<float> cache(cached ? size_t(kd_cache_floats(p.vocab)) : 0);
      for (int64_t r = r0; r < r1; ++r) {
        if (cached && !jsd) {
          const KdPartial st = k.stats_cached(p, r, cache.data(), grad);
          const KdRowGrad lse = kd_row_lse(st, false);
          finish_row(p, r, lse, 0.f, 0.f, st, loss, stats);
          if (!std::isfinite(lse.lz_t) || !std::isfinite(lse.lz_s)) backward_row(p, k, r, 0, p.vocab, stats, *grad_weight, grad);
          else backward_row_cached(p, k, r, stats, *grad_weight, cache.data(), grad);
          continue;
        }
        const KdPartial st = k.stats(p, r, 0, p.vocab);
        const KdRowGrad lse = kd_row_lse(st, p.separate_hard_lse());
        float sum_p = 0.f, sum_q = 0.f;
        if (jsd) k.jsd(p, r, 0, p.vocab, lse, &sum_p, &sum_q, cached ? cache.data() : nullptr);
        finish_row(p, r, lse, sum_p, sum_q, st, loss, stats);
        if (cached) backward_row_cached(p, k, r, stats, *grad_weight, cache.data(), grad);
        else if (grad) backward_row(p, k, r, 0, p.vocab, stats, *grad_weight, grad);
      }
    });
    return;
  }
  // Few long rows: (row, chunk) tasks, merged per row in chunk order.
  const std::vector<KdPartial> merged = row_states(p, k);
  std::vector<float> sums(jsd ? p.rows * 2 : 0);
  if (jsd) row_jsd_sums(p, k, [&](int64_t r) { return kd_row_lse(merged[r], false); }, sums.data());
  for (int64_t r = 0; r < p.rows; ++r) {
    const float sum_p = jsd ? sums[2 * r] : 0.f, sum_q = jsd ? sums[2 * r + 1] : 0.f;
    finish_row(p, r, kd_row_lse(merged[r], p.separate_hard_lse()), sum_p, sum_q, merged[r], loss, stats);
  }
  if (grad) backward_all(p, k, stats, grad_weight, 0, grad);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    c10::string_view divergence, double beta, int64_t ignore_index,
                                                    double soft_coef, double hard_weight) {
  KdLossArgs args = kd_loss_args(student, teacher, labels, temperature, std::string(divergence), beta, ignore_index,
                                 soft_coef, hard_weight);
  const KdLossParams& p = args.params;
  kd_check_labels(p);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.rows}, f32), stats = at::empty({p.rows, kNumStats}, f32);
  forward_rows(p, loss.data_ptr<float>(), stats.data_ptr<float>(), nullptr, nullptr);
  return {loss, stats};
}

at::Tensor kd_loss_backward(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature,
                            c10::string_view divergence, double beta, int64_t ignore_index, double soft_coef,
                            double hard_weight) {
  KdLossArgs args = kd_loss_args(student, teacher, labels, temperature, std::string(divergence), beta, ignore_index,
                                 soft_coef, hard_weight);
  const KdLossParams& p = args.params;
  kd_check_backward(grad_rows, stats, p, student.device());
  at::Tensor grad = empty_reusable(student.sizes(), student.options());
  const at::Tensor g_rows = grad_rows.contiguous(), st = stats.contiguous();
  backward_all(p, kd_kernels(), st.data_ptr<float>(), g_rows.data_ptr<float>(), 1, grad.data_ptr());
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fused(const at::Tensor& student, const at::Tensor& teacher,
                                                              const std::optional<at::Tensor>& labels,
                                                              double temperature, c10::string_view divergence,
                                                              double beta, int64_t ignore_index, double soft_coef,
                                                              double hard_weight, double grad_scale) {
  KdLossArgs args = kd_loss_args(student, teacher, labels, temperature, std::string(divergence), beta, ignore_index,
                                 soft_coef, hard_weight);
  const KdLossParams& p = args.params;
  kd_check_labels(p);
  TORCH_CHECK(std::isfinite(grad_scale), "fastdistill.kd_loss_fused: grad_scale must be finite, got ", grad_scale);
  const float grad_weight = float(grad_scale);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor rows_loss = at::empty({p.rows}, f32), stats = at::empty({p.rows, kNumStats}, f32);
  at::Tensor grad = empty_reusable(student.sizes(), student.options());
  forward_rows(p, rows_loss.data_ptr<float>(), stats.data_ptr<float>(), grad.data_ptr(), &grad_weight);
  return {rows_loss, stats, grad};
}

// ---- vocab-parallel shards (fastdistill/distributed.py) ----
// The raw row state of this shard's columns (kd_loss.h, KdPartialField), unfinished: the ranks merge it. Labels are
// global vocabulary indices here and are not read; with hard_weight they only ask for the T = 1 student sum.
at::Tensor kd_loss_partial(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                           double temperature, c10::string_view divergence, double beta, int64_t ignore_index,
                           double soft_coef, double hard_weight) {
  KdLossArgs args = kd_loss_args(student, teacher, labels, temperature, std::string(divergence), beta, ignore_index,
                                 soft_coef, hard_weight);
  const KdLossParams& p = args.params;
  at::Tensor out = at::empty({p.rows, kNumPartial}, student.options().dtype(at::kFloat));
  const std::vector<KdPartial> states = row_states(p, kd_kernels());
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < p.rows; ++r) kd_store_partial(states[r], o + r * kNumPartial);
  return out;
}

// JSD's two sums over this shard's columns ([rows, 2]: KL(p || M) and KL(q || M) terms), from the merged
// logsumexps of the whole vocabulary in `stats` (kd_loss_forward's layout).
at::Tensor kd_loss_jsd_sums(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                            double temperature, double beta) {
  KdLossArgs args = kd_jsd_sums_args(student, teacher, stats, temperature, beta);
  const KdLossParams& p = args.params;
  const at::Tensor st = stats.contiguous();
  const float* s = st.data_ptr<float>();
  at::Tensor out = at::empty({p.rows, 2}, student.options().dtype(at::kFloat));
  row_jsd_sums(p, kd_kernels(), [&](int64_t r) { return kd_load_stats(s + r * kNumStats); }, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("kd_loss_forward", &kd_loss_forward);
  m.impl("kd_loss_backward", &kd_loss_backward);
  m.impl("kd_loss_fused", &kd_loss_fused);
  m.impl("kd_loss_partial", &kd_loss_partial);
  m.impl("kd_loss_jsd_sums", &kd_loss_jsd_sums);
}

}  // namespace fastdistill::cpu::kd

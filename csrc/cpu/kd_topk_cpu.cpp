// CPU registration of the top-k teacher loss: the row schedule, the k-sized work per row (used slots, the outcome
// algebra of fastdistill/kd_topk.h in fp64) around the vocabulary-sized passes of cpu/kd_topk_kernels.h. What the
// ops accept is glue/kd_topk.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/kd_topk_kernels.h"
#include "cpu/reusable_buffer.h"
#include "glue/kd_topk.h"

namespace fastdistill::cpu::kd {
namespace {

constexpr float kNegInf = -INFINITY;

// A row's first bad slot, reported after the parallel loop (an exception must not cross ATen's pool, and the
// first bad row is then the same for any thread count).
struct SlotError {
  enum Kind { none = 0, out_of_range = 1, duplicate = 2 } kind = none;
  int64_t slot = 0, index = 0;
};

// The sorted used indices of `row` into `cuts`, or the row's error.
SlotError used_indices(const KdTopkParams& p, int64_t row, std::vector<int64_t>& cuts) {
  cuts.clear();
  for (int64_t i = row * p.k; i < (row + 1) * p.k; ++i) {
    if (kd_topk_logprob(p, i) == kNegInf) continue;
    const int64_t idx = kd_topk_index(p, i);
    if (idx < 0 || idx >= p.kd.vocab) return {SlotError::out_of_range, i - row * p.k, idx};
    cuts.push_back(idx);
  }
  std::sort(cuts.begin(), cuts.end());
  const auto dup = std::adjacent_find(cuts.begin(), cuts.end());
  if (dup != cuts.end()) return {SlotError::duplicate, 0, *dup};
  return {};
}

void raise_first(const KdTopkParams& p, const std::vector<SlotError>& errors) {
  for (int64_t r = 0; r < p.kd.rows; ++r) {
    const SlotError& e = errors[r];
    TORCH_CHECK(e.kind != SlotError::out_of_range, "fastdistill.kd_loss: teacher_topk indices must be in [0, ",
                p.kd.vocab, "), got ", e.index, " at row ", r, ", slot ", e.slot);
    TORCH_CHECK(e.kind != SlotError::duplicate, "fastdistill.kd_loss: teacher_topk's used indices must be distinct "
                "within a row, got ", e.index, " twice in row ", r);
  }
}

template <class F>
void parallel_rows(const KdLossParams& p, const F& f) {
  at::parallel_for(0, p.rows, std::max<int64_t>(1, 32768 / p.vocab), [&](int64_t r0, int64_t r1) {
    FlushDenormals flush;
    std::vector<int64_t> cuts;
    for (int64_t r = r0; r < r1; ++r) f(r, cuts);
  });
}

// The log q of a used column (fp64 from here: the k-sized sums are cheap, the vocabulary pass is fp32).
double log_q(const KdLossParams& p, int64_t row, int64_t col, double m_s, double lz_s) {
  return (double(kd_student_logit(p, row, col)) - m_s) * double(p.inv_temperature) - lz_s;
}

KdTopkRow<double> row_coefs(const float* st) {
  KdTopkRow<double> c;
  c.mean = st[kTopkMean];
  c.tail_coef = st[kTopkTailCoef];
  c.coef_q = st[kTopkCoefQ];
  c.coef_p = st[kTopkCoefP];
  return c;
}

void forward_row(const KdTopkParams& p, const KdTopkKernels& k, int64_t r, std::vector<int64_t>& cuts, float* loss,
                 float* stats, SlotError& error) {
  const KdLossParams& kd = p.kd;
  error = used_indices(p, r, cuts);
  if (error.kind != SlotError::none) return;
  const KdPartial tail = k.tail_stats(p, r, cuts.data(), int64_t(cuts.size()));
  // The whole row's softmax: the tail's state merged with the used columns'.
  float m = tail.m_s;
  for (const int64_t c : cuts) m = std::max(m, kd_student_logit(kd, r, c));
  const double m_s = m == kNegInf ? 0.0 : m, inv_t = kd.inv_temperature;
  const bool hard = kd.separate_hard_lse();
  double z_s = 0, z_h = 0;
  if (tail.m_s != kNegInf) {
    z_s = double(tail.z_s) * std::exp((double(tail.m_s) - m_s) * inv_t);
    z_h = hard ? double(tail.z_h) * std::exp(double(tail.m_s) - m_s) : 0.0;
  }
  for (const int64_t c : cuts) {
    const double x = double(kd_student_logit(kd, r, c)) - m_s;
    z_s += std::exp(x * inv_t);
    if (hard) z_h += std::exp(x);
  }
  const double lz_s = std::log(z_s), lz_h = hard ? std::log(z_h) : lz_s;
  KdTopkSums<double> sums;
  for (int64_t i = r * p.k; i < (r + 1) * p.k; ++i) {
    const float lp = kd_topk_logprob(p, i);
    if (lp != kNegInf) sums.add(kd.divergence, double(kd.beta), double(lp), log_q(kd, r, kd_topk_index(p, i), m_s, lz_s));
  }
  const double lq_tail = tail.z_s > 0 ? (double(tail.m_s) - m_s) * inv_t + std::log(double(tail.z_s)) - lz_s : -INFINITY;
  const KdTopkRow<double> row = kd_topk_finish(kd.divergence, p.tail, double(kd.beta), sums,
                                               int64_t(cuts.size()) < kd.vocab, lq_tail);
  double total = kd.soft_coef != 0.f ? double(kd.soft_coef) * row.divergence : 0.0;
  if (kd.has_hard() && kd.counted(r)) total += double(kd.hard_weight) * (m_s - kd_student_logit(kd, r, kd.labels[r]) + lz_h);
  loss[r] = kd.counted(r) ? float(total) : 0.f;
  float* st = stats + r * kNumStats;
  st[kTopkMaxStudent] = float(m_s);
  st[kTopkLogSumStudent] = float(lz_s);
  st[kTopkLogSumHard] = kd.has_hard() ? float(lz_h) : 0.f;
  st[kTopkMean] = float(row.mean);
  st[kTopkTailCoef] = float(row.tail_coef);
  st[kTopkCoefQ] = float(row.coef_q);
  st[kTopkCoefP] = float(row.coef_p);
  st[7] = 0.f;
}

template <class TS>
void backward_used(const KdTopkParams& p, int64_t r, const float* st, float soft, float hard, TS* g) {
  const KdLossParams& kd = p.kd;
  const KdTopkRow<double> coefs = row_coefs(st);
  const double m_s = st[kTopkMaxStudent], lz_s = st[kTopkLogSumStudent], lz_h = st[kTopkLogSumHard];
  const int64_t label = kd.has_hard() ? kd.labels[r] : -1;
  for (int64_t i = r * p.k; i < (r + 1) * p.k; ++i) {
    const float lp = kd_topk_logprob(p, i);
    if (lp == kNegInf) continue;
    const int64_t c = kd_topk_index(p, i);
    double v = double(soft) * kd_topk_used_grad(kd.divergence, p.tail, double(kd.beta), coefs, double(lp),
                                                log_q(kd, r, c, m_s, lz_s));
    if (hard != 0.f) v += double(hard) * (std::exp(double(kd_student_logit(kd, r, c)) - m_s - lz_h) - (c == label));
    from_float(float(v), g + c);
  }
}

void backward_row(const KdTopkParams& p, const KdTopkKernels& k, int64_t r, std::vector<int64_t>& cuts,
                  const float* stats, float g_row, void* grad, SlotError& error) {
  const KdLossParams& kd = p.kd;
  error = used_indices(p, r, cuts);  // the gradient's stores at the used columns must stay inside the row
  if (error.kind != SlotError::none) return;
  const int64_t elem = kd.student_dtype == DType::f32 ? 4 : 2;
  if (!kd.counted(r)) {
    std::memset(static_cast<char*>(grad) + r * kd.vocab * elem, 0, kd.vocab * elem);
    return;
  }
  const float* st = stats + r * kNumStats;
  KdRowGrad rg;
  rg.m_s = st[kTopkMaxStudent];
  rg.lz_s = st[kTopkLogSumStudent];
  rg.lz_h = kd.separate_hard_lse() ? st[kTopkLogSumHard] : rg.lz_s;
  rg.hard = kd.has_hard() ? g_row * kd.hard_weight : 0.f;
  rg.label = kd.has_hard() ? kd.labels[r] : -1;
  const float soft = kd_topk_soft(kd, g_row);
  k.tail_backward(p, r, rg, float(double(soft) * st[kTopkTailCoef]), grad);
  switch (kd.student_dtype) {
    case DType::bf16: backward_used(p, r, st, soft, rg.hard, static_cast<bf16_t*>(grad) + r * kd.vocab); break;
    case DType::f16: backward_used(p, r, st, soft, rg.hard, static_cast<f16_t*>(grad) + r * kd.vocab); break;
    default: backward_used(p, r, st, soft, rg.hard, static_cast<float*>(grad) + r * kd.vocab);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_topk_forward(const at::Tensor& student, const at::Tensor& indices,
                                                    const at::Tensor& logprobs, const std::optional<at::Tensor>& labels,
                                                    double temperature, c10::string_view divergence, double beta,
                                                    int64_t ignore_index, double soft_coef, double hard_weight,
                                                    c10::string_view tail) {
  const KdTopkArgs args = kd_topk_args(student, indices, logprobs, labels, temperature, std::string(divergence), beta,
                                       ignore_index, soft_coef, hard_weight, std::string(tail));
  const KdTopkParams& p = args.params;
  kd_check_labels(p.kd);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.kd.rows}, f32), stats = at::empty({p.kd.rows, kNumStats}, f32);
  const KdTopkKernels& k = kd_topk_kernels();
  std::vector<SlotError> errors(p.kd.rows);
  float* l = loss.data_ptr<float>();
  float* s = stats.data_ptr<float>();
  parallel_rows(p.kd, [&](int64_t r, std::vector<int64_t>& cuts) { forward_row(p, k, r, cuts, l, s, errors[r]); });
  raise_first(p, errors);
  return {loss, stats};
}

at::Tensor kd_topk_backward(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& indices,
                            const at::Tensor& logprobs, const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                            double temperature, c10::string_view divergence, double beta, int64_t ignore_index,
                            double soft_coef, double hard_weight, c10::string_view tail) {
  const KdTopkArgs args = kd_topk_args(student, indices, logprobs, labels, temperature, std::string(divergence), beta,
                                       ignore_index, soft_coef, hard_weight, std::string(tail));
  const KdTopkParams& p = args.params;
  kd_check_backward(grad_rows, stats, p.kd, student.device());
  at::Tensor grad = empty_reusable(student.sizes(), student.options());
  const at::Tensor g = grad_rows.contiguous(), st = stats.contiguous();
  const KdTopkKernels& k = kd_topk_kernels();
  std::vector<SlotError> errors(p.kd.rows);
  const float* gr = g.data_ptr<float>();
  const float* sp = st.data_ptr<float>();
  void* out = grad.data_ptr();
  parallel_rows(p.kd, [&](int64_t r, std::vector<int64_t>& cuts) { backward_row(p, k, r, cuts, sp, gr[r], out, errors[r]); });
  raise_first(p, errors);
  return grad;
}

// Forward and gradient in one call (eager CPU training): each row's gradient is written right after its loss, while
// the row is still in cache, for d loss / d row_loss = grad_scale on every row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_topk_fused(const at::Tensor& student, const at::Tensor& indices,
                                                              const at::Tensor& logprobs,
                                                              const std::optional<at::Tensor>& labels,
                                                              double temperature, c10::string_view divergence,
                                                              double beta, int64_t ignore_index, double soft_coef,
                                                              double hard_weight, c10::string_view tail,
                                                              double grad_scale) {
  const KdTopkArgs args = kd_topk_args(student, indices, logprobs, labels, temperature, std::string(divergence), beta,
                                       ignore_index, soft_coef, hard_weight, std::string(tail));
  const KdTopkParams& p = args.params;
  kd_check_labels(p.kd);
  TORCH_CHECK(std::isfinite(grad_scale), "fastdistill.kd_topk_fused: grad_scale must be finite, got ", grad_scale);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.kd.rows}, f32), stats = at::empty({p.kd.rows, kNumStats}, f32);
  at::Tensor grad = empty_reusable(student.sizes(), student.options());
  const KdTopkKernels& k = kd_topk_kernels();
  std::vector<SlotError> errors(p.kd.rows);
  float* l = loss.data_ptr<float>();
  float* st = stats.data_ptr<float>();
  void* out = grad.data_ptr();
  parallel_rows(p.kd, [&](int64_t r, std::vector<int64_t>& cuts) {
    forward_row(p, k, r, cuts, l, st, errors[r]);
    if (errors[r].kind == SlotError::none) backward_row(p, k, r, cuts, st, float(grad_scale), out, errors[r]);
  });
  raise_first(p, errors);
  return {loss, stats, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("kd_topk_forward", &kd_topk_forward);
  m.impl("kd_topk_backward", &kd_topk_backward);
  m.impl("kd_topk_fused", &kd_topk_fused);
}

}  // namespace fastdistill::cpu::kd

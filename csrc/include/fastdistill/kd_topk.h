// Distillation against a top-k teacher: torch-free parameters and the per-row outcome algebra, shared by the CPU
// kernels, the CUDA kernels and the SIMT emulator.
//
// The teacher of a row is k slots (index, log p at the distillation temperature); a slot whose log p is -inf is
// unused. U = the used indices (distinct), b = student / T, q = softmax(b) over the whole vocabulary.
//   bucket:      k+1 outcomes, the used tokens plus one tail (none when U is the whole vocabulary), with
//                p_tail = max(0, 1 - sum_U p) and q_tail = sum of q outside U (a sum, never 1 - sum_U q).
//                Forward KL, reverse KL and JSD apply to these outcomes; with U = everything this is kd_loss.
//   renormalize: forward KL only: KL(p_hat || q), p_hat = p / sum_U p on U (0 elsewhere), q over the vocabulary.
// The gradient of every case has the form d D / d b_j = q_j (h_o(j) - H): h of the outcome that holds column j,
// H = sum_o q_o h_o. So every tail column shares one coefficient, and only the k used columns differ.
#pragma once
#include <cmath>

#include "fastdistill/kd_loss.h"

namespace fastdistill {

enum class TopkTail : int { bucket = 0, renormalize = 1 };
enum class IndexType : int { u8 = 0, i8 = 1, i16 = 2, u16 = 3, i32 = 4, i64 = 5 };

struct KdTopkParams {
  // The student, labels, temperature, divergence and weights; kd.teacher is unused.
  KdLossParams kd;
  int64_t k = 0;                  // slots per row; indices and logprobs are contiguous [rows, k]
  const void* indices = nullptr;  // IndexType
  const void* logprobs = nullptr; // DType
  IndexType index_type = IndexType::i64;
  DType logprob_dtype = DType::f32;
  TopkTail tail = TopkTail::bucket;
};

FD_HD int64_t kd_topk_index(const KdTopkParams& p, int64_t i) {
  switch (p.index_type) {
    case IndexType::u8: return static_cast<const uint8_t*>(p.indices)[i];
    case IndexType::i8: return static_cast<const int8_t*>(p.indices)[i];
    case IndexType::i16: return static_cast<const int16_t*>(p.indices)[i];
    case IndexType::u16: return static_cast<const uint16_t*>(p.indices)[i];
    case IndexType::i32: return static_cast<const int32_t*>(p.indices)[i];
    default: return static_cast<const int64_t*>(p.indices)[i];
  }
}

FD_HD float kd_topk_logprob(const KdTopkParams& p, int64_t i) {
  switch (p.logprob_dtype) {
    case DType::bf16: return to_float(static_cast<const bf16_t*>(p.logprobs)[i]);
    case DType::f16: return to_float(static_cast<const f16_t*>(p.logprobs)[i]);
    default: return static_cast<const float*>(p.logprobs)[i];
  }
}

// Per-row statistics written by the forward for the backward: [rows, kNumStats] fp32.
enum KdTopkStat : int {
  kTopkMaxStudent = 0, kTopkLogSumStudent = 1,  // the full row's softmax of student / T as (raw max, log sum)
  kTopkLogSumHard = 2,                          // student at T = 1, same max, when there is a hard term
  kTopkMean = 3,       // H (reverse KL: KL; JSD: KL(q || M); forward KL: unused)
  kTopkTailCoef = 4,   // h_tail - H: every tail column's gradient is soft * this * q_j
  kTopkCoefQ = 5,      // forward KL: a used column's gradient is soft * (coef_q q_j - coef_p p_j)
  kTopkCoefP = 6,
};

// One outcome's terms of the divergence: p (log p - log x) and q (log q - log x), x = q (forward KL), p (reverse
// KL) or M = beta p + (1 - beta) q (JSD); a side of zero probability contributes 0 (its log may be -inf).
template <class R>
struct KdTopkTerms {
  R on_p = 0, on_q = 0;
};

// exp / log / log1p for both fp32 (GPU) and fp64 (CPU row sums) under one name.
FD_HD float kd_exp(float x) { return expf(x); }
FD_HD double kd_exp(double x) { return exp(x); }
FD_HD float kd_log(float x) { return logf(x); }
FD_HD double kd_log(double x) { return log(x); }
FD_HD float kd_log1p(float x) { return log1pf(x); }
FD_HD double kd_log1p(double x) { return log1p(x); }

template <class R>
FD_HD R kd_topk_log_mixture(R lp, R lq, R beta) {
  const R x = lp + kd_log(beta), y = lq + kd_log1p(-beta);
  const R hi = x > y ? x : y, lo = x > y ? y : x;
  return hi == R(-INFINITY) ? hi : hi + kd_log1p(kd_exp(lo - hi));
}

template <class R>
FD_HD KdTopkTerms<R> kd_topk_outcome(Divergence d, R beta, R lp, R lq) {
  KdTopkTerms<R> t;
  const R p = kd_exp(lp), q = kd_exp(lq);
  if (d == Divergence::forward_kl) {
    if (p > 0) t.on_p = p * (lp - lq);
  } else if (d == Divergence::reverse_kl) {
    if (q > 0) t.on_q = q * (lq - lp);
  } else {
    const R lm = kd_topk_log_mixture(lp, lq, beta);
    if (p > 0) t.on_p = p * (lp - lm);
    if (q > 0) t.on_q = q * (lq - lm);
  }
  return t;
}

// A row's sums over its used outcomes, accumulated slot by slot (in any order: they are plain sums).
template <class R>
struct KdTopkSums {
  R mass_p = 0;  // sum_U p
  R on_p = 0, on_q = 0;
  FD_HD void add(Divergence d, R beta, R lp, R lq) {
    const KdTopkTerms<R> t = kd_topk_outcome(d, beta, lp, lq);
    mass_p += kd_exp(lp);
    on_p += t.on_p;
    on_q += t.on_q;
  }
  FD_HD void merge(const KdTopkSums& o) {
    mass_p += o.mass_p;
    on_p += o.on_p;
    on_q += o.on_q;
  }
};

// The finished row: its divergence and the gradient's coefficients (stats kTopkMean..kTopkCoefP).
template <class R>
struct KdTopkRow {
  R divergence = 0, mean = 0, tail_coef = 0, coef_q = 0, coef_p = 0;
};

// lq_tail: log q_tail (-inf for an all -inf tail); has_tail: U is not the whole vocabulary. beta as kd_loss (JSD
// with beta 0 or 1 arrives as forward / reverse KL).
template <class R>
FD_HD KdTopkRow<R> kd_topk_finish(Divergence d, TopkTail tail, R beta, KdTopkSums<R> s, bool has_tail, R lq_tail) {
  KdTopkRow<R> r;
  if (tail == TopkTail::renormalize) {  // forward KL of p_hat: (sum_U p (lp - lq)) / S - log S
    if (s.mass_p > 0) {
      r.divergence = s.on_p / s.mass_p - kd_log(s.mass_p);
      r.coef_q = 1;
      r.coef_p = 1 / s.mass_p;
    }
    r.tail_coef = r.coef_q;  // a row without a used slot has no soft term
    return r;
  }
  const R p_tail = s.mass_p < 1 ? 1 - s.mass_p : R(0);
  const R lp_tail = kd_log(p_tail), q_tail = kd_exp(lq_tail);
  if (has_tail) {
    const KdTopkTerms<R> t = kd_topk_outcome(d, beta, lp_tail, lq_tail);
    s.mass_p += p_tail;
    s.on_p += t.on_p;
    s.on_q += t.on_q;
  }
  if (d == Divergence::forward_kl) {  // h_o = -p_o / q_o, H = -sum_o p_o
    r.divergence = s.on_p;
    r.coef_q = s.mass_p;  // sum over every outcome, the tail's included
    r.coef_p = 1;
    r.tail_coef = p_tail == 0 ? r.coef_q : (q_tail > 0 ? r.coef_q - p_tail / q_tail : R(0));
  } else if (d == Divergence::reverse_kl) {  // h_o = log q_o - log p_o, H = KL
    r.divergence = s.on_q;
    r.mean = s.on_q;
    r.tail_coef = q_tail > 0 ? (lq_tail - lp_tail) - r.mean : R(0);
  } else {  // h_o = (1 - beta) log(q_o / M_o), H = (1 - beta) KL(q || M); (1 - beta) goes into the soft weight
    r.divergence = beta * s.on_p + (1 - beta) * s.on_q;
    r.mean = s.on_q;
    r.tail_coef = q_tail > 0 ? (lq_tail - kd_topk_log_mixture(lp_tail, lq_tail, beta)) - r.mean : R(0);
  }
  return r;
}

// d D / d b_j of a used column j with log p lp and log q lq, over the row's finished coefficients
// (JSD without its (1 - beta), which the caller folds into the soft weight).
template <class R>
FD_HD R kd_topk_used_grad(Divergence d, TopkTail tail, R beta, const KdTopkRow<R>& r, R lp, R lq) {
  const R q = kd_exp(lq);
  if (d == Divergence::forward_kl || tail == TopkTail::renormalize) return r.coef_q * q - r.coef_p * kd_exp(lp);
  if (!(q > 0)) return 0;
  if (d == Divergence::reverse_kl) return q * ((lq - lp) - r.mean);
  return q * ((lq - kd_topk_log_mixture(lp, lq, beta)) - r.mean);
}

// The soft weight of every column's gradient: grad_row * soft_coef / T, times (1 - beta) for JSD.
FD_HD float kd_topk_soft(const KdLossParams& p, float grad_row) {
  const float soft = grad_row * p.soft_coef * p.inv_temperature;
  return p.divergence == Divergence::jsd ? soft * (1.f - p.beta) : soft;
}

// ---- GPU limits and launchers (kernels: kd_topk.cuh; launchers: cuda/kd_topk.cu) ----
namespace kd {

// The GPU forward marks a row's used columns in a shared-memory bitmap of this many 32-bit words.
constexpr int64_t kTopkBitmapWords = 8192;
constexpr int64_t kTopkMaxVocabGpu = kTopkBitmapWords * 32;  // 262144

namespace gpu {
// Row losses and statistics ([rows], [rows, kNumStats]); one block of `threads` per row.
void topk_forward(const KdTopkParams& p, float* row_loss, float* stats, int threads, GpuStream s);
// d loss / d student into `grad` (contiguous [rows, vocab], the student's dtype).
void topk_backward(const KdTopkParams& p, const float* grad_rows, const float* stats, void* grad, int threads,
                   GpuStream s);
}  // namespace gpu

}  // namespace kd
}  // namespace fastdistill

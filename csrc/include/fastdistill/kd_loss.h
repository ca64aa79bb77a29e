// Fused distillation loss: torch-free parameters, the per-row softmax state and the GPU launch rules, shared
// by the CPU kernels, the CUDA kernels and the SIMT emulator.
//
// Notation: a = teacher / T, b = student / T, A = logsumexp(a), B = logsumexp(b),
// p = softmax(a), q = softmax(b).  Forward KL(p||q), reverse KL(q||p), or generalised JSD with
// M = beta p + (1-beta) q, weighted beta KL(p||M) + (1-beta) KL(q||M) (beta = 0 / 1 are mapped to
// forward / reverse KL by the glue).  Optional hard term: CE(student at T = 1, label).
#pragma once
#include <cmath>

#include "fastdistill/common.h"

namespace fastdistill {

enum class Divergence : int { forward_kl = 0, reverse_kl = 1, jsd = 2 };

struct KdLossParams {
  int64_t rows = 0, vocab = 0;
  const void* student = nullptr;
  const void* teacher = nullptr;
  DType student_dtype = DType::f32, teacher_dtype = DType::f32;
  RowLayout student_rows, teacher_rows;  // the gradient is always contiguous [rows, vocab]
  const int64_t* labels = nullptr;       // [rows] or null
  int64_t ignore_index = -100;
  float temperature = 1.f, inv_temperature = 1.f;
  Divergence divergence = Divergence::forward_kl;
  float beta = 0.5f;
  float soft_coef = 1.f;    // soft_weight * (T^2 if scaled)
  float hard_weight = 0.f;  // weight of the cross-entropy term (needs labels)

  FD_HD bool has_hard() const { return hard_weight != 0.f && labels != nullptr; }
  // The hard term needs logsumexp(student) at T = 1, a separate statistic unless T == 1.
  FD_HD bool separate_hard_lse() const { return has_hard() && temperature != 1.f; }
  FD_HD bool counted(int64_t row) const { return labels == nullptr || labels[row] != ignore_index; }
};

// One raw student logit (for the hard term), whatever the storage dtype.
FD_HD float kd_student_logit(const KdLossParams& p, int64_t row, int64_t col) {
  const int64_t i = p.student_rows.offset(row) + col;
  switch (p.student_dtype) {
    case DType::bf16: return to_float(static_cast<const bf16_t*>(p.student)[i]);
    case DType::f16: return to_float(static_cast<const f16_t*>(p.student)[i]);
    default: return static_cast<const float*>(p.student)[i];
  }
}

// Per-row statistics written by the forward for the backward: [rows, 8] fp32. Each logsumexp is
// kept as (raw max m, log sum exp((x - m) / T)), so that log softmax = (x - m) / T - log sum keeps
// full accuracy (one rounded lse would lose ulp(max / T): 0.016 at |x| / T = 2e5).
enum KdStat : int {
  kStatMaxStudent = 0, kStatLogSumStudent = 1,  // student / T
  kStatMaxTeacher = 2, kStatLogSumTeacher = 3,  // teacher / T
  kStatLogSumHard = 4,                          // student at T = 1 (same max), when there is a hard term
  kStatAux = 5,     // reverse KL: w / z_s, the q-mean of the centred log ratio; JSD: KL(q || M); else 0
  kStatCentre = 6,  // reverse KL: the centre k (kd_centre); else 0
  kNumStats = 8     // 7 reserved
};

// Online-softmax state of one row, or of one column range of a row. Ranges merge associatively
// (kd_merge), which is what splitting a long row across threads (or, later, across vocab-parallel
// shards) relies on. Maxima are of the RAW logits and every exponent is formed as (x - max) / T:
// the difference is exact for the entries that matter, where x / T - max / T would carry the
// rounding of two large numbers (0.016 absolute at |x| / T = 2e5). With u = (x - m) / T,
//   z_t = sum exp(u_t), z_s = sum exp(u_s), z_h = sum exp(s - m_s) (student at T = 1),
//   w = sum exp(u_P) ((P - Q) - k) / T
// with P the "primary" side (teacher for forward KL, student for reverse KL), Q the other, and the
// centre k = P - Q at P's argmax (kd_centre). Centred there, the column that dominates the divergence
// contributes exactly 0 to w and to the gradient's log ratio, so a peaked softmax does not subtract
// two rounded ~|x| / T numbers (reverse KL's gradient q (log q/p - KL) cancelled to 1e-3 at |x| / T = 1e4).
struct KdPartial {
  float m_t = -INFINITY, z_t = 0.f;
  float m_s = -INFINITY, z_s = 0.f, z_h = 0.f;
  float w = 0.f;
  float q_at = -INFINITY;  // Q's logit at P's argmax (the first one, in merge order)
};

// exp((m_old - m_new) * inv_t): the factor that moves a sum from max m_old to max m_new >= m_old.
FD_HD float kd_rescale(float m_old, float m_new, float inv_t) {
  return m_old == -INFINITY ? 0.f : expf((m_old - m_new) * inv_t);
}

// x - x is 0 exactly for finite x and NaN for inf and NaN (no isfinite: the same code compiles for host and device).
FD_HD bool kd_finite(float x) { return x - x == 0.f; }

// The centre k of w's log ratio: P - Q at P's argmax, or mP - mQ (maxima of -inf read as 0) where that is
// not finite (Q is -inf there: the divergence is +inf anyway; or the row is empty).
FD_HD float kd_centre(float m_p, float m_q, float q_at) {
  const float k = m_p - q_at;
  if (kd_finite(k)) return k;
  return (m_p == -INFINITY ? 0.f : m_p) - (m_q == -INFINITY ? 0.f : m_q);
}

// k - mP + mQ: what the centre takes out of the log ratio beyond the maxima, mQ - (Q at P's argmax),
// formed directly (0 for the fallback centre, measured from the same maxima as the log sums).
FD_HD float kd_centre_offset(float m_q, float m_p, float q_at) { return kd_finite(m_p - q_at) ? m_q - q_at : 0.f; }

FD_HD bool kd_teacher_primary(Divergence d) { return d != Divergence::reverse_kl; }

// Moves a state onto new maxima and P's argmax value q_at, rescaling its sums:
// w' = (w - (k' - k) zP / T) exp((mP - mP') / T).
FD_HD void kd_recentre(KdPartial& x, float m_t, float m_s, float q_at, float inv_t, bool teacher_primary) {
  const float zp = teacher_primary ? x.z_t : x.z_s;
  if (zp == 0.f) {
    x.w = 0.f;
  } else {
    const float k_old = teacher_primary ? kd_centre(x.m_t, x.m_s, x.q_at) : kd_centre(x.m_s, x.m_t, x.q_at);
    const float k_new = teacher_primary ? kd_centre(m_t, m_s, q_at) : kd_centre(m_s, m_t, q_at);
    const float mp_old = teacher_primary ? x.m_t : x.m_s, mp_new = teacher_primary ? m_t : m_s;
    if (k_new != k_old || mp_new != mp_old) x.w = (x.w - (k_new - k_old) * inv_t * zp) * kd_rescale(mp_old, mp_new, inv_t);
  }
  x.z_t *= kd_rescale(x.m_t, m_t, inv_t);
  x.z_s *= kd_rescale(x.m_s, m_s, inv_t);
  x.z_h *= kd_rescale(x.m_s, m_s, 1.f);
  x.m_t = m_t;
  x.m_s = m_s;
  x.q_at = q_at;
}

FD_HD KdPartial kd_merge(KdPartial x, KdPartial y, float inv_t, bool teacher_primary) {
  const float m_t = fmaxf(x.m_t, y.m_t), m_s = fmaxf(x.m_s, y.m_s);
  const bool y_leads = teacher_primary ? y.m_t > x.m_t : y.m_s > x.m_s;
  const float q_at = y_leads ? y.q_at : x.q_at;
  kd_recentre(x, m_t, m_s, q_at, inv_t, teacher_primary);
  kd_recentre(y, m_t, m_s, q_at, inv_t, teacher_primary);
  x.z_t += y.z_t;
  x.z_s += y.z_s;
  x.z_h += y.z_h;
  x.w += y.w;
  return x;
}

// Coefficients of one row's gradient: d loss / d student_j =
//   soft * dD/db_j + hard * (softmax(student)_j - [j == label]).
struct KdRowGrad {
  float soft = 0.f;  // grad_row * soft_coef / T
  float hard = 0.f;  // grad_row * hard_weight
  float m_s = 0.f, lz_s = 0.f, m_t = 0.f, lz_t = 0.f, lz_h = 0.f, aux = 0.f;
  float centre = 0.f;  // reverse KL: the k of w (kd_centre), which its gradient's log ratio is measured from
  int64_t label = -1;  // column that gets -hard, or -1
};

// The logsumexp halves of a finished row state (a row of only -inf keeps max 0, log sum -inf).
FD_HD KdRowGrad kd_row_lse(const KdPartial& x, bool separate_hard) {
  KdRowGrad r;
  r.m_t = x.m_t == -INFINITY ? 0.f : x.m_t;
  r.lz_t = logf(x.z_t);
  r.m_s = x.m_s == -INFINITY ? 0.f : x.m_s;
  r.lz_s = logf(x.z_s);
  r.lz_h = separate_hard ? logf(x.z_h) : r.lz_s;
  return r;
}

// The divergence of a finished row for forward / reverse KL (JSD needs its second pass), from the row's
// state and its logsumexp halves (lse = kd_row_lse(x, .): the logs are not taken twice):
// KL = w / zP + (k - mP + mQ) / T - lz_P + lz_Q.
FD_HD float kd_kl_from_state(const KdPartial& x, const KdRowGrad& lse, Divergence d, float inv_t) {
  if (d == Divergence::forward_kl) return x.w / x.z_t + kd_centre_offset(x.m_s, x.m_t, x.q_at) * inv_t - lse.lz_t + lse.lz_s;
  return x.w / x.z_s + kd_centre_offset(x.m_t, x.m_s, x.q_at) * inv_t - lse.lz_s + lse.lz_t;
}

// What a finished KL row's gradient needs beyond the logsumexps: reverse KL's log q/p - KL is
// (s - t - k) / T - w / z_s, so the row keeps k and the mean w / z_s (the two cancel exactly where q = 1).
FD_HD void kd_set_gradient_stats(const KdPartial& x, Divergence d, KdRowGrad& lse) {
  const bool rkl = d == Divergence::reverse_kl;
  lse.aux = rkl ? x.w / x.z_s : 0.f;
  lse.centre = rkl ? kd_centre(x.m_s, x.m_t, x.q_at) : 0.f;
}

FD_HD void kd_store_stats(const KdRowGrad& r, float* stats_row) {
  stats_row[kStatMaxStudent] = r.m_s;
  stats_row[kStatLogSumStudent] = r.lz_s;
  stats_row[kStatMaxTeacher] = r.m_t;
  stats_row[kStatLogSumTeacher] = r.lz_t;
  stats_row[kStatLogSumHard] = r.lz_h;
  stats_row[kStatAux] = r.aux;
  stats_row[kStatCentre] = r.centre;
  stats_row[7] = 0.f;
}

FD_HD KdRowGrad kd_load_stats(const float* stats_row) {
  KdRowGrad r;
  r.m_s = stats_row[kStatMaxStudent];
  r.lz_s = stats_row[kStatLogSumStudent];
  r.m_t = stats_row[kStatMaxTeacher];
  r.lz_t = stats_row[kStatLogSumTeacher];
  r.lz_h = stats_row[kStatLogSumHard];
  r.aux = stats_row[kStatAux];
  r.centre = stats_row[kStatCentre];
  return r;
}

// ---- vocab-parallel shards (fastdistill/distributed.py) ----
// kd_loss_partial's output: a row's raw KdPartial over this shard's columns, [rows, kNumPartial] fp32, merged
// across ranks by all-reduces (MAX of the maxima, then SUM of the rescaled sums). fastdistill/distributed.py
// reads these positions by name.
enum KdPartialField : int {
  kPartMaxTeacher = 0, kPartSumTeacher = 1,                      // m_t, z_t
  kPartMaxStudent = 2, kPartSumStudent = 3, kPartSumHard = 4,    // m_s, z_s, z_h
  kPartWeighted = 5, kPartOtherAtMax = 6,                        // w, q_at
  kNumPartial = 8                                                // 7 reserved
};

FD_HD void kd_store_partial(const KdPartial& x, float* out_row) {
  out_row[kPartMaxTeacher] = x.m_t;
  out_row[kPartSumTeacher] = x.z_t;
  out_row[kPartMaxStudent] = x.m_s;
  out_row[kPartSumStudent] = x.z_s;
  out_row[kPartSumHard] = x.z_h;
  out_row[kPartWeighted] = x.w;
  out_row[kPartOtherAtMax] = x.q_at;
  out_row[7] = 0.f;
}

// ---- GPU launch rules and launchers (kernels: kd_loss.cuh; launchers: cuda/kd_loss.cu) ----
namespace kd {

struct KdLaunchConfig {
  int threads = 256;
  int splits = 1;
};

// Pack width (elements) of the kernels for a pair of dtypes: 16 bytes of the wider one.
inline int kd_vec_for(DType s, DType t) { return (s == DType::f32 || t == DType::f32) ? 4 : 8; }

// Threads per block and row splits. threads/splits > 0 force a value (tests); sms = multiprocessors.
inline KdLaunchConfig kd_launch_config(int64_t rows, int64_t vocab, int vec, int threads, int splits, int sms) {
  KdLaunchConfig c;
  if (threads > 0) {
    c.threads = threads;
  } else {
    const int64_t packs = (vocab + vec - 1) / vec;
    int t = 32;
    while (t < 512 && t * 4 < packs) t *= 2;  // at least ~4 packs per thread before widening the block
    c.threads = t;
  }
  if (splits > 0) {
    c.splits = splits;
  } else {
    // Enough blocks to fill the machine twice, but each block still streams >= 16 packs per thread.
    const int64_t want = (2 * int64_t(sms) + rows - 1) / (rows > 0 ? rows : 1);
    const int64_t most = vocab / (int64_t(c.threads) * vec * 16);
    int64_t sp = want < most ? want : most;
    c.splits = int(sp < 1 ? 1 : (sp > 128 ? 128 : sp));
  }
  return c;
}

// Workspace floats the forward needs (0 when splits == 1).
inline int64_t kd_forward_workspace_floats(int64_t rows, int splits) {
  if (splits <= 1) return 0;
  const int64_t state = int64_t(sizeof(KdPartial) / sizeof(float));
  return rows * splits * (state > 2 ? state : 2);
}

namespace gpu {
// Row losses and statistics ([rows], [rows, kNumStats]); `workspace` holds kd_forward_workspace_floats floats.
void forward(const KdLossParams& p, float* row_loss, float* stats, float* workspace, KdLaunchConfig c, GpuStream s);
// d loss / d student into `grad` (contiguous [rows, vocab], the student's dtype).
void backward(const KdLossParams& p, const float* grad_rows, const float* stats, void* grad, KdLaunchConfig c,
              GpuStream s);
// Vocab-parallel shards: the unfinished state ([rows, kNumPartial]), and JSD's two sums ([rows, 2]) from the merged
// statistics; `workspace` holds kd_forward_workspace_floats floats.
void partial(const KdLossParams& p, float* out, float* workspace, KdLaunchConfig c, GpuStream s);
void jsd_sums(const KdLossParams& p, const float* stats, float* out, float* workspace, KdLaunchConfig c, GpuStream s);
}  // namespace gpu

}  // namespace kd
}  // namespace fastdistill

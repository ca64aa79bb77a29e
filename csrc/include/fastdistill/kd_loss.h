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
  kStatAux = 5,                                 // reverse KL: the divergence; JSD: KL(q || M); else 0
  kNumStats = 8                                 // 6, 7 reserved
};

// Online-softmax state of one row, or of one column range of a row. Ranges merge associatively
// (kd_merge), which is what splitting a long row across threads (or, later, across vocab-parallel
// shards) relies on. Maxima are of the RAW logits and every exponent is formed as (x - max) / T:
// the difference is exact for the entries that matter, where x / T - max / T would carry the
// rounding of two large numbers (0.016 absolute at |x| / T = 2e5). With u = (x - m) / T,
//   z_t = sum exp(u_t), z_s = sum exp(u_s), z_h = sum exp(s - m_s) (student at T = 1),
//   w = sum exp(u_P) (u_P - u_Q)
// with P the "primary" side (teacher for forward KL, student for reverse KL) and Q the other.
struct KdPartial {
  float m_t = -INFINITY, z_t = 0.f;
  float m_s = -INFINITY, z_s = 0.f, z_h = 0.f;
  float w = 0.f;
};

// exp((m_old - m_new) * inv_t): the factor that moves a sum from max m_old to max m_new >= m_old.
FD_HD float kd_rescale(float m_old, float m_new, float inv_t) {
  return m_old == -INFINITY ? 0.f : expf((m_old - m_new) * inv_t);
}

// Re-centres w from (mP_old, mQ_old) onto (mP_new, mQ_new): w' = (w - (dP - dQ) zP) exp(-dP).
FD_HD float kd_shift_w(float w, float zP, float mP_old, float mP_new, float mQ_old, float mQ_new, float inv_t) {
  if (zP == 0.f) return 0.f;
  const float dQ = mQ_old == -INFINITY ? 0.f : mQ_new - mQ_old;  // w is already +inf in that case
  return (w - ((mP_new - mP_old) - dQ) * inv_t * zP) * kd_rescale(mP_old, mP_new, inv_t);
}

// Moves a state onto new maxima, rescaling its sums.
FD_HD void kd_recentre(KdPartial& x, float m_t, float m_s, float inv_t, bool teacher_primary) {
  if (teacher_primary) x.w = kd_shift_w(x.w, x.z_t, x.m_t, m_t, x.m_s, m_s, inv_t);
  else x.w = kd_shift_w(x.w, x.z_s, x.m_s, m_s, x.m_t, m_t, inv_t);
  x.z_t *= kd_rescale(x.m_t, m_t, inv_t);
  x.z_s *= kd_rescale(x.m_s, m_s, inv_t);
  x.z_h *= kd_rescale(x.m_s, m_s, 1.f);
  x.m_t = m_t;
  x.m_s = m_s;
}

FD_HD KdPartial kd_merge(KdPartial x, KdPartial y, float inv_t, bool teacher_primary) {
  const float m_t = fmaxf(x.m_t, y.m_t), m_s = fmaxf(x.m_s, y.m_s);
  kd_recentre(x, m_t, m_s, inv_t, teacher_primary);
  kd_recentre(y, m_t, m_s, inv_t, teacher_primary);
  x.z_t += y.z_t;
  x.z_s += y.z_s;
  x.z_h += y.z_h;
  x.w += y.w;
  return x;
}

FD_HD bool kd_teacher_primary(Divergence d) { return d != Divergence::reverse_kl; }

// Coefficients of one row's gradient: d loss / d student_j =
//   soft * dD/db_j + hard * (softmax(student)_j - [j == label]).
struct KdRowGrad {
  float soft = 0.f;  // grad_row * soft_coef / T
  float hard = 0.f;  // grad_row * hard_weight
  float m_s = 0.f, lz_s = 0.f, m_t = 0.f, lz_t = 0.f, lz_h = 0.f, aux = 0.f;
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
// state and its logsumexp halves (lse = kd_row_lse(x, .): the logs are not taken twice).
FD_HD float kd_kl_from_state(const KdPartial& x, const KdRowGrad& lse, Divergence d) {
  return d == Divergence::forward_kl ? x.w / x.z_t - lse.lz_t + lse.lz_s : x.w / x.z_s - lse.lz_s + lse.lz_t;
}

FD_HD void kd_store_stats(const KdRowGrad& r, float* stats_row) {
  stats_row[kStatMaxStudent] = r.m_s;
  stats_row[kStatLogSumStudent] = r.lz_s;
  stats_row[kStatMaxTeacher] = r.m_t;
  stats_row[kStatLogSumTeacher] = r.lz_t;
  stats_row[kStatLogSumHard] = r.lz_h;
  stats_row[kStatAux] = r.aux;
  stats_row[6] = stats_row[7] = 0.f;
}

FD_HD KdRowGrad kd_load_stats(const float* stats_row) {
  KdRowGrad r;
  r.m_s = stats_row[kStatMaxStudent];
  r.lz_s = stats_row[kStatLogSumStudent];
  r.m_t = stats_row[kStatMaxTeacher];
  r.lz_t = stats_row[kStatLogSumTeacher];
  r.lz_h = stats_row[kStatLogSumHard];
  r.aux = stats_row[kStatAux];
  return r;
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
}  // namespace gpu

}  // namespace kd
}  // namespace fastdistill

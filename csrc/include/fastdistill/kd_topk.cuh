// Distillation against a top-k teacher: CUDA kernels written against simt.h (GPUs, and the CPU SIMT emulator in the
// tests). Same parameters, statistics and outcome algebra as the CPU kernels (fastdistill/kd_topk.h).
//
// Forward: one block per row. The block marks the row's used columns in a shared-memory bitmap, then streams the
// row once: every thread keeps an online softmax (raw max, sum of exp((x - max) / T)) of the tail columns it sees,
// so q_tail is a sum over the tail itself. The used columns (k of them) are read by slot. Block reductions give
// the row's statistics; thread 0 finishes the row with kd_topk_finish.
// Backward: one block per row, every column as a tail column, then (after a barrier) the used columns overwritten.
#pragma once
#include "fastdistill/kd_topk.h"
#include "fastdistill/simt.h"

namespace fastdistill::kd {

// Max or sum of v over the block, returned to every thread. `red` (32 floats of shared memory) may be reused by
// the next call: the leading barrier waits for this call's readers of the previous one.
template <bool kMax>
FD_DEVICE float topk_block_reduce(float v, float* red) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, nwarps = int(blockDim.x) >> 5;
  v = kMax ? simt::warp_max(v) : simt::warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : (kMax ? -INFINITY : 0.f);
  return kMax ? simt::warp_max(v) : simt::warp_sum(v);
}

FD_DEVICE float topk_rescale(float m_old, float m_new, float inv_t) {
  return m_old == -INFINITY ? 0.f : expf((m_old - m_new) * inv_t);
}

FD_DEVICE void topk_check_slot(int64_t idx, int64_t vocab) {
  FD_KERNEL_ASSERT(idx >= 0 && idx < vocab, "fastdistill.kd_loss: a used teacher_topk index is outside [0, V)");
}

// grid.x = rows; blockDim.x a multiple of 32. vocab <= kTopkMaxVocabGpu.
template <class Ts>
FD_KERNEL void __launch_bounds__(1024) kd_topk_forward_kernel(KdTopkParams p, float* row_loss, float* stats) {
  FD_SHARED(uint32_t, used_bits, kTopkBitmapWords);
  FD_SHARED(float, red, 32);
  const KdLossParams& kd = p.kd;
  const int64_t row = blockIdx.x, V = kd.vocab, words = (V + 31) / 32;
  const int tid = int(threadIdx.x), nt = int(blockDim.x);
  const Ts* s = static_cast<const Ts*>(kd.student) + kd.student_rows.offset(row);
  const float inv_t = kd.inv_temperature;
  const bool hard = kd.separate_hard_lse();
  for (int64_t w = tid; w < words; w += nt) used_bits[w] = 0u;
  __syncthreads();
  float n_used = 0.f;
  for (int64_t i = row * p.k + tid; i < (row + 1) * p.k; i += nt) {
    if (kd_topk_logprob(p, i) == -INFINITY) continue;
    const int64_t idx = kd_topk_index(p, i);
    topk_check_slot(idx, V);
    const uint32_t bit = 1u << uint32_t(idx & 31);
    const uint32_t old = atomicOr(&used_bits[idx >> 5], bit);
    FD_KERNEL_ASSERT((old & bit) == 0u, "fastdistill.kd_loss: teacher_topk has a duplicate used index in a row");
    n_used += 1.f;
  }
  __syncthreads();
  // The tail: an online softmax per thread over the unmarked columns.
  float m = -INFINITY, z = 0.f, zh = 0.f;
  for (int64_t j = tid; j < V; j += nt) {
    if ((used_bits[j >> 5] >> uint32_t(j & 31)) & 1u) continue;
    const float x = to_float(s[j]);
    if (!(x > -INFINITY)) continue;
    if (x > m) {
      z *= topk_rescale(m, x, inv_t);
      if (hard) zh *= topk_rescale(m, x, 1.f);
      m = x;
    }
    z += expf((x - m) * inv_t);
    if (hard) zh += expf(x - m);
  }
  const float m_tail = topk_block_reduce<true>(m, red);
  const float z_tail = topk_block_reduce<false>(z * topk_rescale(m, m_tail, inv_t), red);
  const float zh_tail = hard ? topk_block_reduce<false>(zh * topk_rescale(m, m_tail, 1.f), red) : 0.f;
  const float used = topk_block_reduce<false>(n_used, red);
  // The used columns, by slot: the whole row's max, then its sums.
  float m_u = -INFINITY;
  for (int64_t i = row * p.k + tid; i < (row + 1) * p.k; i += nt)
    if (kd_topk_logprob(p, i) != -INFINITY) m_u = fmaxf(m_u, to_float(s[kd_topk_index(p, i)]));
  const float m_raw = fmaxf(m_tail, topk_block_reduce<true>(m_u, red));
  const float m_s = m_raw == -INFINITY ? 0.f : m_raw;
  float z_u = 0.f, zh_u = 0.f;
  for (int64_t i = row * p.k + tid; i < (row + 1) * p.k; i += nt) {
    if (kd_topk_logprob(p, i) == -INFINITY) continue;
    const float x = to_float(s[kd_topk_index(p, i)]) - m_s;
    z_u += expf(x * inv_t);
    if (hard) zh_u += expf(x);
  }
  const float z_s = z_tail * topk_rescale(m_tail, m_s, inv_t) + topk_block_reduce<false>(z_u, red);
  const float lz_s = logf(z_s);
  const float lz_h = hard ? logf(zh_tail * topk_rescale(m_tail, m_s, 1.f) + topk_block_reduce<false>(zh_u, red)) : lz_s;
  KdTopkSums<float> sums;
  for (int64_t i = row * p.k + tid; i < (row + 1) * p.k; i += nt) {
    const float lp = kd_topk_logprob(p, i);
    if (lp == -INFINITY) continue;
    sums.add(kd.divergence, kd.beta, lp, (to_float(s[kd_topk_index(p, i)]) - m_s) * inv_t - lz_s);
  }
  sums.mass_p = topk_block_reduce<false>(sums.mass_p, red);
  sums.on_p = topk_block_reduce<false>(sums.on_p, red);
  sums.on_q = topk_block_reduce<false>(sums.on_q, red);
  if (tid != 0) return;
  if (kd.labels != nullptr) {
    const int64_t label = kd.labels[row];
    FD_KERNEL_ASSERT(label == kd.ignore_index || (label >= 0 && label < V),
                     "fastdistill.kd_loss: a label is outside [0, V) and is not ignore_index");
  }
  const float lq_tail = z_tail > 0.f ? (m_tail - m_s) * inv_t + logf(z_tail) - lz_s : -INFINITY;
  const KdTopkRow<float> r = kd_topk_finish(kd.divergence, p.tail, kd.beta, sums, used < float(V), lq_tail);
  float loss = kd.soft_coef != 0.f ? kd.soft_coef * r.divergence : 0.f;
  if (kd.has_hard() && kd.counted(row)) loss += kd.hard_weight * ((m_s - to_float(s[kd.labels[row]])) + lz_h);
  row_loss[row] = kd.counted(row) ? loss : 0.f;
  float* st = stats + row * kNumStats;
  st[kTopkMaxStudent] = m_s;
  st[kTopkLogSumStudent] = lz_s;
  st[kTopkLogSumHard] = kd.has_hard() ? lz_h : 0.f;
  st[kTopkMean] = r.mean;
  st[kTopkTailCoef] = r.tail_coef;
  st[kTopkCoefQ] = r.coef_q;
  st[kTopkCoefP] = r.coef_p;
  st[7] = 0.f;
}

// grid.x = rows; grad is contiguous [rows, vocab] in the student's dtype.
template <class Ts>
FD_KERNEL void __launch_bounds__(1024) kd_topk_backward_kernel(KdTopkParams p, const float* grad_rows,
                                                               const float* stats, Ts* grad) {
  const KdLossParams& kd = p.kd;
  const int64_t row = blockIdx.x, V = kd.vocab;
  const int tid = int(threadIdx.x), nt = int(blockDim.x);
  const Ts* s = static_cast<const Ts*>(kd.student) + kd.student_rows.offset(row);
  Ts* g = grad + row * V;
  if (!kd.counted(row)) {
    for (int64_t j = tid; j < V; j += nt) from_float(0.f, g + j);
    return;
  }
  const float* st = stats + row * kNumStats;
  const float gr = grad_rows[row], inv_t = kd.inv_temperature;
  const float m_s = st[kTopkMaxStudent], lz_s = st[kTopkLogSumStudent], lz_h = st[kTopkLogSumHard];
  const float soft = kd_topk_soft(kd, gr), tail_soft = soft * st[kTopkTailCoef];
  const float hard = kd.has_hard() ? gr * kd.hard_weight : 0.f;
  const bool separate_hard = kd.separate_hard_lse();
  const int64_t label = kd.has_hard() ? kd.labels[row] : -1;
  auto hard_part = [&](int64_t j, float ds, float q) {
    if (hard == 0.f) return 0.f;
    return hard * (separate_hard ? expf(ds - lz_h) : q) - (j == label ? hard : 0.f);
  };
  for (int64_t j = tid; j < V; j += nt) {
    const float ds = to_float(s[j]) - m_s, q = expf(ds * inv_t - lz_s);
    from_float(tail_soft * q + hard_part(j, ds, q), g + j);
  }
  __syncthreads();  // the used columns' values below replace the tail values other threads wrote
  KdTopkRow<float> coefs;
  coefs.mean = st[kTopkMean];
  coefs.tail_coef = st[kTopkTailCoef];
  coefs.coef_q = st[kTopkCoefQ];
  coefs.coef_p = st[kTopkCoefP];
  for (int64_t i = row * p.k + tid; i < (row + 1) * p.k; i += nt) {
    const float lp = kd_topk_logprob(p, i);
    if (lp == -INFINITY) continue;
    const int64_t c = kd_topk_index(p, i);
    topk_check_slot(c, V);
    const float ds = to_float(s[c]) - m_s, lq = ds * inv_t - lz_s;
    const float v = soft * kd_topk_used_grad(kd.divergence, p.tail, kd.beta, coefs, lp, lq);
    from_float(v + hard_part(c, ds, expf(lq)), g + c);
  }
}

}  // namespace fastdistill::kd

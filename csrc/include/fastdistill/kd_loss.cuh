// Fused distillation loss: CUDA kernels written against simt.h (run on GPUs, and on the CPU SIMT
// emulator in the tests). Same parameters, statistics and online-softmax state as the CPU kernels
// (fastdistill/kd_loss.h).
//
// Forward: one block per (row, split). Each thread streams its part of the row in aligned 16-byte
// packs (plus a scalar head/tail), keeping an online-softmax KdPartial; the block merges them with
// warp shuffles and a shared-memory step. With one split the block finishes the row; with several
// (few rows, long rows) every block writes its KdPartial to a [rows, splits] workspace and a merge
// kernel finishes each row (deterministic order). JSD needs logsumexps first, so it runs a second
// pass over the row with the same split scheme. No vocab-sized temporaries anywhere.
// Backward: one block per (row, split), elementwise from the saved statistics.
#pragma once
#include "fastdistill/kd_loss.h"
#include "fastdistill/simt.h"

namespace fastdistill::kd {

template <class Ts, class Tt>
constexpr int kd_vec() {
  return int(16 / (sizeof(Ts) > sizeof(Tt) ? sizeof(Ts) : sizeof(Tt)));
}

// Elements [0, head) and the tail are scalar; [head, head + k*VEC) are aligned packs for every pointer.
struct RowSplit {
  int64_t head = 0;
  bool vec = false;
};

template <int VEC>
FD_DEVICE RowSplit row_split(int64_t V, const void* s, int ss, const void* t, int st, const void* g = nullptr,
                             int sg = 1) {
  RowSplit r;
  const uintptr_t as = reinterpret_cast<uintptr_t>(s);
  const int64_t h = int64_t((uintptr_t(0) - as / uintptr_t(ss)) & uintptr_t(VEC - 1));
  const bool ok = h <= V && (reinterpret_cast<uintptr_t>(t) + uintptr_t(h) * st) % uintptr_t(VEC * st) == 0 &&
                  (g == nullptr || (reinterpret_cast<uintptr_t>(g) + uintptr_t(h) * sg) % uintptr_t(VEC * sg) == 0);
  r.vec = ok && V >= VEC;
  r.head = r.vec ? h : 0;
  return r;
}

// Element range of split k out of n: boundaries at head + multiples of a VEC-rounded chunk.
template <int VEC>
FD_DEVICE void split_range(int64_t V, const RowSplit& rs, int k, int n, int64_t& e0, int64_t& e1) {
  int64_t per = (V + n - 1) / n;
  per = (per + VEC - 1) / VEC * VEC;
  auto bound = [&](int i) -> int64_t {
    if (i <= 0) return 0;
    if (i >= n) return V;
    const int64_t b = rs.head + int64_t(i) * per;
    return b < V ? b : V;
  };
  e0 = bound(k);
  e1 = bound(k + 1);
}

// Calls f.scalar(j) / f.pack(j) (VEC elements from j) for the elements of [e0, e1), strided over the block.
template <int VEC, class F>
FD_DEVICE void for_range(int64_t e0, int64_t e1, const RowSplit& rs, F& f) {
  const int tid = int(threadIdx.x), nt = int(blockDim.x);
  if (!rs.vec) {
    for (int64_t j = e0 + tid; j < e1; j += nt) f.scalar(j);
    return;
  }
  int64_t v0 = e0 <= rs.head ? rs.head : rs.head + (e0 - rs.head + VEC - 1) / VEC * VEC;
  if (v0 > e1) v0 = e1;
  const int64_t v1 = v0 + (e1 - v0) / VEC * VEC;
  for (int64_t j = e0 + tid; j < v0; j += nt) f.scalar(j);
  const int64_t npack = (v1 - v0) / VEC;
  int64_t k = tid;
  for (; k + nt < npack; k += 2 * int64_t(nt)) f.pack2(v0 + k * VEC, v0 + (k + nt) * VEC);
  if (k < npack) f.pack(v0 + k * VEC);
  for (int64_t j = v1 + tid; j < e1; j += nt) f.scalar(j);
}

// ------------------------------------------------------------------------------------------ forward
// Per-thread accumulation of one row range into a KdPartial (same definition as the CPU kernels).
template <class Ts, class Tt>
struct KdAccum {
  static constexpr int VEC = kd_vec<Ts, Tt>();
  const Ts* s;
  const Tt* t;
  float inv_t;
  bool teacher_primary, hard;  // hard: z_h (student at T = 1) kept separately
  KdPartial st;

  // Maxima are of the raw logits; every exponent is (x - max) / T (kd_loss.h).
  FD_DEVICE void add(int n, const float* xs, const float* xt) {
    float ms = st.m_s, mt = st.m_t, q_at = st.q_at;
    for (int i = 0; i < n; ++i) {
      if (teacher_primary ? xt[i] > mt : xs[i] > ms) q_at = teacher_primary ? xs[i] : xt[i];
      ms = fmaxf(ms, xs[i]);
      mt = fmaxf(mt, xt[i]);
    }
    if (ms != st.m_s || mt != st.m_t) kd_recentre(st, mt, ms, q_at, inv_t, teacher_primary);
    const float rt = mt == -INFINITY ? 0.f : mt, rs = ms == -INFINITY ? 0.f : ms;
    const float k = teacher_primary ? kd_centre(mt, ms, q_at) : kd_centre(ms, mt, q_at);
    for (int i = 0; i < n; ++i) {
      const float ds = xs[i] - rs;
      const float ua = (xt[i] - rt) * inv_t, ub = ds * inv_t;
      const float ea = expf(ua), eb = expf(ub);
      st.z_t += ea;
      st.z_s += eb;
      // P - Q, then minus the centre: exactly 0 at P's argmax (KdPartial).
      if (teacher_primary) {
        if (ea > 0.f) st.w += ea * (((xt[i] - xs[i]) - k) * inv_t);
      } else {
        if (eb > 0.f) st.w += eb * (((xs[i] - xt[i]) - k) * inv_t);
      }
      if (hard) st.z_h += expf(ds);
    }
  }
  FD_DEVICE void scalar(int64_t j) {
    const float xs = to_float(s[j]), xt = to_float(t[j]);
    add(1, &xs, &xt);
  }
  FD_DEVICE void load(int64_t j, float* xs, float* xt) {
    const auto ps = simt::load_pack<Ts, VEC>(s + j);
    const auto pt = simt::load_pack<Tt, VEC>(t + j);
    for (int i = 0; i < VEC; ++i) {
      xs[i] = to_float(ps.v[i]);
      xt[i] = to_float(pt.v[i]);
    }
  }
  FD_DEVICE void pack(int64_t j) {
    float xs[VEC], xt[VEC];
    load(j, xs, xt);
    add(VEC, xs, xt);
  }
  FD_DEVICE void pack2(int64_t j0, int64_t j1) {
    float xs0[VEC], xt0[VEC], xs1[VEC], xt1[VEC];
    load(j0, xs0, xt0);
    load(j1, xs1, xt1);
    add(VEC, xs0, xt0);
    add(VEC, xs1, xt1);
  }
};

FD_DEVICE KdPartial shfl_partial(const KdPartial& x, int o) {
  KdPartial y;
  y.m_t = __shfl_xor_sync(0xffffffffu, x.m_t, o);
  y.z_t = __shfl_xor_sync(0xffffffffu, x.z_t, o);
  y.m_s = __shfl_xor_sync(0xffffffffu, x.m_s, o);
  y.z_s = __shfl_xor_sync(0xffffffffu, x.z_s, o);
  y.z_h = __shfl_xor_sync(0xffffffffu, x.z_h, o);
  y.w = __shfl_xor_sync(0xffffffffu, x.w, o);
  y.q_at = __shfl_xor_sync(0xffffffffu, x.q_at, o);
  return y;
}

// Block-wide merge; the result is valid in warp 0. blockDim.x must be a multiple of 32.
FD_DEVICE KdPartial block_merge(KdPartial x, float inv_t, bool teacher_primary) {
  FD_SHARED(KdPartial, warp_states, 32);
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, nwarps = int(blockDim.x) >> 5;
  for (int o = 16; o > 0; o >>= 1) x = kd_merge(x, shfl_partial(x, o), inv_t, teacher_primary);
  if (lane == 0) warp_states[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < nwarps ? warp_states[lane] : KdPartial{};
    for (int o = 16; o > 0; o >>= 1) x = kd_merge(x, shfl_partial(x, o), inv_t, teacher_primary);
  }
  return x;
}

// Block-merged state of split k of `row` (valid in warp 0).
template <class Ts, class Tt>
FD_DEVICE KdPartial kd_split_state(const KdLossParams& p, int64_t row, int k, int splits) {
  constexpr int VEC = kd_vec<Ts, Tt>();
  KdAccum<Ts, Tt> acc;
  acc.s = static_cast<const Ts*>(p.student) + p.student_rows.offset(row);
  acc.t = static_cast<const Tt*>(p.teacher) + p.teacher_rows.offset(row);
  acc.inv_t = p.inv_temperature;
  acc.teacher_primary = kd_teacher_primary(p.divergence);
  acc.hard = p.separate_hard_lse();
  const RowSplit rs = row_split<VEC>(p.vocab, acc.s, sizeof(Ts), acc.t, sizeof(Tt));
  int64_t e0, e1;
  split_range<VEC>(p.vocab, rs, k, splits, e0, e1);
  for_range<VEC>(e0, e1, rs, acc);
  return block_merge(acc.st, acc.inv_t, acc.teacher_primary);
}

// The row loss from the divergence and the statistics (the CPU's finish_row).
template <class Ts>
FD_DEVICE float kd_row_loss(const KdLossParams& p, int64_t row, float D, const KdRowGrad& lse) {
  if (p.labels != nullptr) {  // the host checks CPU labels; on the GPU that would need a sync
    const int64_t label = p.labels[row];
    FD_KERNEL_ASSERT(label == p.ignore_index || (label >= 0 && label < p.vocab),
                     "fastdistill.kd_loss: a label is outside [0, V) and is not ignore_index");
  }
  if (!p.counted(row)) return 0.f;
  float loss = p.soft_coef != 0.f ? p.soft_coef * D : 0.f;
  if (p.has_hard()) {
    const Ts* s = static_cast<const Ts*>(p.student) + p.student_rows.offset(row);
    loss += p.hard_weight * ((lse.m_s - to_float(s[p.labels[row]])) + lse.lz_h);
  }
  return loss;
}

// Finishes a row from its merged state: statistics, and (except JSD) the row loss.
template <class Ts>
FD_DEVICE void kd_finish(const KdLossParams& p, int64_t row, const KdPartial& x, float* row_loss, float* stats) {
  KdRowGrad lse = kd_row_lse(x, p.separate_hard_lse());
  if (p.divergence == Divergence::jsd) {  // aux and the loss come from the second pass
    kd_store_stats(lse, stats + row * kNumStats);
    return;
  }
  const float D = kd_kl_from_state(x, lse, p.divergence, p.inv_temperature);
  kd_set_gradient_stats(x, p.divergence, lse);
  row_loss[row] = kd_row_loss<Ts>(p, row, D, lse);
  if (!p.has_hard()) lse.lz_h = 0.f;
  kd_store_stats(lse, stats + row * kNumStats);
}

// grid.x = rows * splits; ws: [rows, splits] KdPartial (unused when splits == 1).
template <class Ts, class Tt>
FD_KERNEL void __launch_bounds__(1024) kd_forward_kernel(KdLossParams p, float* row_loss, float* stats,
                                                         KdPartial* ws, int splits) {
  const int64_t row = int64_t(blockIdx.x) / splits;
  const int k = int(int64_t(blockIdx.x) % splits);
  const KdPartial x = kd_split_state<Ts, Tt>(p, row, k, splits);
  if (threadIdx.x == 0) {
    if (splits == 1) kd_finish<Ts>(p, row, x, row_loss, stats);
    else ws[row * splits + k] = x;
  }
}

// One thread per row: merges the splits in order and finishes the row.
template <class Ts>
FD_KERNEL void kd_forward_merge_kernel(KdLossParams p, float* row_loss, float* stats, const KdPartial* ws,
                                       int splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  const bool tp = kd_teacher_primary(p.divergence);
  KdPartial x = ws[row * splits];
  for (int k = 1; k < splits; ++k) x = kd_merge(x, ws[row * splits + k], p.inv_temperature, tp);
  kd_finish<Ts>(p, row, x, row_loss, stats);
}

// ---------------------------------------------------------------------------- JSD second pass
FD_DEVICE float log_add_exp(float x, float y) {
  const float m = fmaxf(x, y);
  if (m == -INFINITY) return -INFINITY;
  return m + log1pf(expf(fminf(x, y) - m));
}

struct JsdConsts {
  float m_t, lz_t, m_s, lz_s, log_beta, log_1m_beta;
};

template <class Ts, class Tt>
struct JsdAccum {
  static constexpr int VEC = kd_vec<Ts, Tt>();
  const Ts* s;
  const Tt* t;
  float inv_t;
  JsdConsts c;
  float kp = 0.f, kq = 0.f;  // KL(p||M), KL(q||M)

  FD_DEVICE void add1(float xs, float xt) {
    const float lp = (xt - c.m_t) * inv_t - c.lz_t, lq = (xs - c.m_s) * inv_t - c.lz_s;
    const float lm = log_add_exp(lp + c.log_beta, lq + c.log_1m_beta);
    const float pp = expf(lp), qq = expf(lq);
    if (pp > 0.f) kp += pp * (lp - lm);
    if (qq > 0.f) kq += qq * (lq - lm);
  }
  FD_DEVICE void scalar(int64_t j) { add1(to_float(s[j]), to_float(t[j])); }
  FD_DEVICE void pack(int64_t j) {
    const auto ps = simt::load_pack<Ts, VEC>(s + j);
    const auto pt = simt::load_pack<Tt, VEC>(t + j);
    for (int i = 0; i < VEC; ++i) add1(to_float(ps.v[i]), to_float(pt.v[i]));
  }
  FD_DEVICE void pack2(int64_t j0, int64_t j1) {
    const auto ps0 = simt::load_pack<Ts, VEC>(s + j0);
    const auto pt0 = simt::load_pack<Tt, VEC>(t + j0);
    const auto ps1 = simt::load_pack<Ts, VEC>(s + j1);
    const auto pt1 = simt::load_pack<Tt, VEC>(t + j1);
    for (int i = 0; i < VEC; ++i) add1(to_float(ps0.v[i]), to_float(pt0.v[i]));
    for (int i = 0; i < VEC; ++i) add1(to_float(ps1.v[i]), to_float(pt1.v[i]));
  }
};

FD_DEVICE JsdConsts jsd_consts(const KdLossParams& p, const float* stats, int64_t row) {
  const KdRowGrad r = kd_load_stats(stats + row * kNumStats);
  return {r.m_t, r.lz_t, r.m_s, r.lz_s, logf(p.beta), log1pf(-p.beta)};
}

template <class Ts>
FD_DEVICE void jsd_finish(const KdLossParams& p, int64_t row, float kp, float kq, float* row_loss, float* stats) {
  const float D = p.beta * kp + (1.f - p.beta) * kq;
  float* st = stats + row * kNumStats;
  KdRowGrad lse = kd_load_stats(st);
  row_loss[row] = kd_row_loss<Ts>(p, row, D, lse);
  st[kStatAux] = kq;
  if (!p.has_hard()) st[kStatLogSumHard] = 0.f;
}

// Block-wide sums of two values, valid in thread 0. blockDim.x must be a multiple of 32.
FD_DEVICE void block_sum2(float& a, float& b) {
  FD_SHARED(float, red, 64);
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, nwarps = int(blockDim.x) >> 5;
  a = simt::warp_sum(a);
  b = simt::warp_sum(b);
  if (lane == 0) {
    red[warp] = a;
    red[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = simt::warp_sum(lane < nwarps ? red[lane] : 0.f);
    b = simt::warp_sum(lane < nwarps ? red[32 + lane] : 0.f);
  }
}

// JSD's two sums over split k of `row`, given the row's statistics (valid in thread 0).
template <class Ts, class Tt>
FD_DEVICE void kd_jsd_split_sums(const KdLossParams& p, const float* stats, int64_t row, int k, int splits, float& kp,
                                 float& kq) {
  constexpr int VEC = kd_vec<Ts, Tt>();
  JsdAccum<Ts, Tt> acc;
  acc.s = static_cast<const Ts*>(p.student) + p.student_rows.offset(row);
  acc.t = static_cast<const Tt*>(p.teacher) + p.teacher_rows.offset(row);
  acc.inv_t = p.inv_temperature;
  acc.c = jsd_consts(p, stats, row);
  const RowSplit rs = row_split<VEC>(p.vocab, acc.s, sizeof(Ts), acc.t, sizeof(Tt));
  int64_t e0, e1;
  split_range<VEC>(p.vocab, rs, k, splits, e0, e1);
  for_range<VEC>(e0, e1, rs, acc);
  kp = acc.kp;
  kq = acc.kq;
  block_sum2(kp, kq);
}

// grid.x = rows * splits; ws: [rows, splits, 2] partial (kp, kq) sums (unused when splits == 1).
template <class Ts, class Tt>
FD_KERNEL void __launch_bounds__(1024) kd_jsd_kernel(KdLossParams p, float* row_loss, float* stats, float* ws,
                                                     int splits) {
  const int64_t row = int64_t(blockIdx.x) / splits;
  const int k = int(int64_t(blockIdx.x) % splits);
  float kp, kq;
  kd_jsd_split_sums<Ts, Tt>(p, stats, row, k, splits, kp, kq);
  if (threadIdx.x == 0) {
    if (splits == 1) {
      jsd_finish<Ts>(p, row, kp, kq, row_loss, stats);
    } else {
      ws[(row * splits + k) * 2] = kp;
      ws[(row * splits + k) * 2 + 1] = kq;
    }
  }
}

template <class Ts>
FD_KERNEL void kd_jsd_merge_kernel(KdLossParams p, float* row_loss, float* stats, const float* ws, int splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  float kp = 0.f, kq = 0.f;
  for (int k = 0; k < splits; ++k) {
    kp += ws[(row * splits + k) * 2];
    kq += ws[(row * splits + k) * 2 + 1];
  }
  jsd_finish<Ts>(p, row, kp, kq, row_loss, stats);
}

// ---------------------------------------------------------------------------------------- backward
template <class Ts, class Tt>
struct KdGrad {
  static constexpr int VEC = kd_vec<Ts, Tt>();
  const Ts* s;
  const Tt* t;
  Ts* g;
  float inv_t, soft, hard, beta, log_beta, log_1m_beta;
  KdRowGrad r;
  Divergence div;
  int64_t label;
  bool zero, separate_hard;

  // The CPU's backward_range, element by element.
  FD_DEVICE float grad1(int64_t j, float xs, float xt) const {
    if (zero) return 0.f;
    const float ds = xs - r.m_s;
    const float la = (xt - r.m_t) * inv_t - r.lz_t, lb = ds * inv_t - r.lz_s, q = expf(lb);
    float d;
    if (div == Divergence::forward_kl) d = q - expf(la);
    else if (div == Divergence::reverse_kl) d = q > 0.f ? q * (((xs - xt) - r.centre) * inv_t - r.aux) : 0.f;
    else d = q > 0.f ? q * (lb - log_add_exp(la + log_beta, lb + log_1m_beta) - r.aux) : 0.f;
    float out = soft * d;
    if (hard != 0.f) {
      out = fmaf(hard, separate_hard ? expf(ds - r.lz_h) : q, out);
      if (j == label) out -= hard;
    }
    return out;
  }
  FD_DEVICE void scalar(int64_t j) { from_float(grad1(j, to_float(s[j]), to_float(t[j])), g + j); }
  FD_DEVICE void pack(int64_t j) {
    const auto ps = simt::load_pack<Ts, VEC>(s + j);
    const auto pt = simt::load_pack<Tt, VEC>(t + j);
    simt::Pack<Ts, VEC> out;
    for (int i = 0; i < VEC; ++i) from_float(grad1(j + i, to_float(ps.v[i]), to_float(pt.v[i])), &out.v[i]);
    simt::store_pack<Ts, VEC>(g + j, out);
  }
  FD_DEVICE void pack2(int64_t j0, int64_t j1) {
    pack(j0);
    pack(j1);
  }
};

// grid.x = rows * splits; grad is contiguous [rows, vocab] in the student's dtype.
template <class Ts, class Tt>
FD_KERNEL void __launch_bounds__(1024) kd_backward_kernel(KdLossParams p, const float* grad_rows,
                                                          const float* stats, Ts* grad, int splits) {
  constexpr int VEC = kd_vec<Ts, Tt>();
  const int64_t row = int64_t(blockIdx.x) / splits;
  const int k = int(int64_t(blockIdx.x) % splits);
  KdGrad<Ts, Tt> f;
  f.s = static_cast<const Ts*>(p.student) + p.student_rows.offset(row);
  f.t = static_cast<const Tt*>(p.teacher) + p.teacher_rows.offset(row);
  f.g = grad + row * p.vocab;
  const float gr = p.counted(row) ? grad_rows[row] : 0.f;
  f.r = kd_load_stats(stats + row * kNumStats);
  f.inv_t = p.inv_temperature;
  f.soft = p.divergence == Divergence::jsd ? gr * p.soft_coef * p.inv_temperature * (1.f - p.beta)
                                           : gr * p.soft_coef * p.inv_temperature;
  f.hard = p.has_hard() ? gr * p.hard_weight : 0.f;
  f.zero = !p.counted(row);
  f.separate_hard = p.separate_hard_lse();
  f.div = p.divergence;
  f.beta = p.beta;
  f.log_beta = logf(p.beta);
  f.log_1m_beta = log1pf(-p.beta);
  f.label = p.has_hard() ? p.labels[row] : -1;
  const RowSplit rs = row_split<VEC>(p.vocab, f.s, sizeof(Ts), f.t, sizeof(Tt), f.g, sizeof(Ts));
  int64_t e0, e1;
  split_range<VEC>(p.vocab, rs, k, splits, e0, e1);
  for_range<VEC>(e0, e1, rs, f);
}

// ------------------------------------------------------------ vocab-parallel shards (fastdistill/distributed.py)
// The forward's row passes over this shard's columns, leaving what the ranks merge: the unfinished state
// (kd_loss_partial, kd_store_partial's layout) or, given the merged statistics, JSD's two sums (kd_loss_jsd_sums).

// grid.x = rows * splits; out: [rows, kNumPartial]; ws: [rows, splits] KdPartial (unused when splits == 1).
template <class Ts, class Tt>
FD_KERNEL void __launch_bounds__(1024) kd_partial_kernel(KdLossParams p, float* out, KdPartial* ws, int splits) {
  const int64_t row = int64_t(blockIdx.x) / splits;
  const int k = int(int64_t(blockIdx.x) % splits);
  const KdPartial x = kd_split_state<Ts, Tt>(p, row, k, splits);
  if (threadIdx.x == 0) {
    if (splits == 1) kd_store_partial(x, out + row * kNumPartial);
    else ws[row * splits + k] = x;
  }
}

// One thread per row: merges the splits in order (as kd_forward_merge_kernel) into the row's unfinished state.
template <class Ts>
FD_KERNEL void kd_partial_merge_kernel(KdLossParams p, float* out, const KdPartial* ws, int splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  const bool tp = kd_teacher_primary(p.divergence);
  KdPartial x = ws[row * splits];
  for (int k = 1; k < splits; ++k) x = kd_merge(x, ws[row * splits + k], p.inv_temperature, tp);
  kd_store_partial(x, out + row * kNumPartial);
}

// grid.x = rows * splits; stats: the merged [rows, kNumStats] statistics; out: [rows, 2]; ws: [rows, splits, 2].
template <class Ts, class Tt>
FD_KERNEL void __launch_bounds__(1024) kd_jsd_sums_kernel(KdLossParams p, const float* stats, float* out, float* ws,
                                                          int splits) {
  const int64_t row = int64_t(blockIdx.x) / splits;
  const int k = int(int64_t(blockIdx.x) % splits);
  float kp, kq;
  kd_jsd_split_sums<Ts, Tt>(p, stats, row, k, splits, kp, kq);
  if (threadIdx.x == 0) {
    float* dst = splits == 1 ? out + row * 2 : ws + (row * splits + k) * 2;
    dst[0] = kp;
    dst[1] = kq;
  }
}

template <class Ts>
FD_KERNEL void kd_jsd_sums_merge_kernel(KdLossParams p, float* out, const float* ws, int splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  float kp = 0.f, kq = 0.f;
  for (int k = 0; k < splits; ++k) {
    kp += ws[(row * splits + k) * 2];
    kq += ws[(row * splits + k) * 2 + 1];
  }
  out[row * 2] = kp;
  out[row * 2 + 1] = kq;
}

}  // namespace fastdistill::kd

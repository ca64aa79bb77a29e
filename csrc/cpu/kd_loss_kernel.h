// The fused distillation loss, written once over the vector interface of csrc/cpu/simd/*.h and
// instantiated per ISA by kd_loss_{avx512,avx2,scalar}.cpp inside namespace fastdistill::cpu::<isa>.
// Deliberately no include guard and no includes: see csrc/cpu/simd/prelude.h.

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Rows are processed in blocks that stay in L1 between the block's max pass and its sum pass, so
// the running maxima move once per block, not once per element (one exp per element, not two).
constexpr int64_t kBlock = 2048;

template <class T>
inline VecF load_or_neg_inf(const T* p, int64_t i, int64_t n) {
  return n - i >= kLanes ? vload(p + i) : vload_tail(p + i, int(n - i), kNegInf);
}

template <class T>
inline void store_upto(T* p, int64_t i, int64_t n, VecF x) {
  if (n - i >= kLanes) vstore(p + i, x);
  else vstore_tail(p + i, x, int(n - i));
}

// kW: 0 = no weighted sum (JSD first pass), 1 = teacher primary (forward KL), 2 = student primary.
template <int kW, bool kHard, class TS, class TT>
KdPartial stats_range(const TS* s, const TT* t, int64_t n, float inv_t) {
  const VecF zero = vset1(0.f), vinv = vset1(inv_t);
  VecF zt = zero, zs = zero, zh = zero, w = zero;
  float m_t = kNegInf, m_s = kNegInf, m_h = kNegInf;
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t c1 = std::min(n, c0 + kBlock);
    VecF bt = vset1(kNegInf), bs = vset1(kNegInf);
    for (int64_t c = c0; c < c1; c += kLanes) {
      bt = vmax(bt, load_or_neg_inf(t, c, c1));
      bs = vmax(bs, load_or_neg_inf(s, c, c1));
    }
    // Scaling by 1/T > 0 is monotonic, also after rounding: max(x) / T == max(x / T).
    const float nt = std::max(m_t, vmaxall(bt) * inv_t), ns = std::max(m_s, vmaxall(bs) * inv_t);
    const float nh = kHard ? std::max(m_h, vmaxall(bs)) : kNegInf;
    if (nt > m_t || ns > m_s) {
      const float st = kd_rescale(m_t, nt), ss = kd_rescale(m_s, ns);
      if (kW == 1 && m_t != kNegInf) {
        const float d = (nt - m_t) - (m_s == kNegInf ? 0.f : ns - m_s);
        w = (w - vset1(d) * zt) * vset1(st);
      } else if (kW == 2 && m_s != kNegInf) {
        const float d = (ns - m_s) - (m_t == kNegInf ? 0.f : nt - m_t);
        w = (w - vset1(d) * zs) * vset1(ss);
      }
      zt = zt * vset1(st);
      zs = zs * vset1(ss);
      m_t = nt;
      m_s = ns;
    }
    if (kHard && nh > m_h) {
      zh = zh * vset1(kd_rescale(m_h, nh));
      m_h = nh;
    }
    // A block whose maxima are still -inf holds only -inf: any finite reference gives exp(.) = 0.
    const VecF rt = vset1(m_t == kNegInf ? 0.f : m_t), rs = vset1(m_s == kNegInf ? 0.f : m_s);
    const VecF rh = vset1(m_h == kNegInf ? 0.f : m_h);
    for (int64_t c = c0; c < c1; c += kLanes) {
      const VecF sr = load_or_neg_inf(s, c, c1);
      const VecF da = load_or_neg_inf(t, c, c1) * vinv - rt, db = sr * vinv - rs;
      const VecF ea = vexp(da), eb = vexp(db);
      zt = zt + ea;
      zs = zs + eb;
      if (kW == 1) w = w + vselect(vgt(ea, zero), ea * (da - db), zero);
      if (kW == 2) w = w + vselect(vgt(eb, zero), eb * (db - da), zero);
      if (kHard) zh = zh + vexp(sr - rh);
    }
  }
  KdPartial out;
  out.m_t = m_t;
  out.z_t = vsum(zt);
  out.m_s = m_s;
  out.z_s = vsum(zs);
  out.w = vsum(w);
  out.m_h = m_h;
  out.z_h = vsum(zh);
  return out;
}

// log M for the JSD mixture, from la = log p, lb = log q: logaddexp(la + log beta, lb + log(1-beta)).
inline VecF jsd_log_m(VecF la, VecF lb, VecF log_beta, VecF log_1m_beta) {
  const VecF x = la + log_beta, y = lb + log_1m_beta;
  return vmax(x, y) + vlog1p01(vexp(vset1(0.f) - vabs(x - y)));
}

// JSD second pass: sums of p (log p - log M) and q (log q - log M) over a column range.
template <class TS, class TT>
void jsd_range(const TS* s, const TT* t, int64_t n, float inv_t, float lse_t, float lse_s, float beta,
               float* sum_p, float* sum_q) {
  const VecF zero = vset1(0.f), vinv = vset1(inv_t), va = vset1(lse_t), vb = vset1(lse_s);
  const VecF lbeta = vset1(std::log(beta)), l1mb = vset1(std::log1p(-beta));
  VecF sp = zero, sq = zero;
  for (int64_t c = 0; c < n; c += kLanes) {
    const VecF la = load_or_neg_inf(t, c, n) * vinv - va, lb = load_or_neg_inf(s, c, n) * vinv - vb;
    const VecF p = vexp(la), q = vexp(lb), lm = jsd_log_m(la, lb, lbeta, l1mb);
    sp = sp + vselect(vgt(p, zero), p * (la - lm), zero);
    sq = sq + vselect(vgt(q, zero), q * (lb - lm), zero);
  }
  *sum_p = vsum(sp);
  *sum_q = vsum(sq);
}

// kHard: 0 = none, 1 = softmax(student) at T = 1 computed separately, 2 = it equals q (T == 1).
// `col0` is the column of s[0] within the row (for the label position).
template <int kDiv, int kHard, class TS, class TT>
void backward_range(const TS* s, const TT* t, TS* g, int64_t n, int64_t col0, const KdRowGrad& r,
                    float inv_t, float beta) {
  const VecF zero = vset1(0.f), vinv = vset1(inv_t), va = vset1(r.lse_t), vb = vset1(r.lse_s);
  const VecF vsoft = vset1(kDiv == 2 ? r.soft * (1.f - beta) : r.soft), vhard = vset1(r.hard);
  const VecF vaux = vset1(r.aux), vlh = vset1(r.lse_h);
  const VecF lbeta = vset1(kDiv == 2 ? std::log(beta) : 0.f), l1mb = vset1(kDiv == 2 ? std::log1p(-beta) : 0.f);
  const int64_t label = r.label - col0;  // label column relative to this range
  for (int64_t c = 0; c < n; c += kLanes) {
    const VecF sr = load_or_neg_inf(s, c, n);
    const VecF la = load_or_neg_inf(t, c, n) * vinv - va, lb = sr * vinv - vb;
    const VecF q = vexp(lb);
    VecF gv;
    if (kDiv == 0) {
      gv = vsoft * (q - vexp(la));
    } else if (kDiv == 1) {
      gv = vsoft * vselect(vgt(q, zero), q * (lb - la - vaux), zero);
    } else {
      gv = vsoft * vselect(vgt(q, zero), q * (lb - jsd_log_m(la, lb, lbeta, l1mb) - vaux), zero);
    }
    if (kHard == 1) gv = vfma(vhard, vexp(sr - vlh), gv);
    if (kHard == 2) gv = vfma(vhard, q, gv);
    if (kHard != 0 && label >= c && label < c + kLanes) {
      alignas(64) float lanes[kLanes];
      std::memcpy(lanes, &gv, sizeof(lanes));
      lanes[label - c] -= r.hard;
      std::memcpy(&gv, lanes, sizeof(lanes));
    }
    store_upto(g, c, n, gv);
  }
}

// ---- entry points: runtime dtype / mode switch onto the templates above ----

template <class F>
auto with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::bf16: return f(static_cast<const bf16_t*>(nullptr));
    case DType::f16: return f(static_cast<const f16_t*>(nullptr));
    default: return f(static_cast<const float*>(nullptr));
  }
}

KdPartial kd_row_stats(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1) {
  return with_dtype(p.student_dtype, [&](auto s_tag) {
    return with_dtype(p.teacher_dtype, [&](auto t_tag) {
      using TS = std::remove_const_t<std::remove_pointer_t<decltype(s_tag)>>;
      using TT = std::remove_const_t<std::remove_pointer_t<decltype(t_tag)>>;
      const TS* s = static_cast<const TS*>(p.student) + p.student_rows.offset(row) + c0;
      const TT* t = static_cast<const TT*>(p.teacher) + p.teacher_rows.offset(row) + c0;
      const int64_t n = c1 - c0;
      const bool hard = p.separate_hard_lse();
      switch (p.divergence) {
        case Divergence::forward_kl:
          return hard ? stats_range<1, true>(s, t, n, p.inv_temperature) : stats_range<1, false>(s, t, n, p.inv_temperature);
        case Divergence::reverse_kl:
          return hard ? stats_range<2, true>(s, t, n, p.inv_temperature) : stats_range<2, false>(s, t, n, p.inv_temperature);
        default:
          return hard ? stats_range<0, true>(s, t, n, p.inv_temperature) : stats_range<0, false>(s, t, n, p.inv_temperature);
      }
    });
  });
}

void kd_row_jsd(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, float lse_t, float lse_s,
                float* sum_p, float* sum_q) {
  with_dtype(p.student_dtype, [&](auto s_tag) {
    return with_dtype(p.teacher_dtype, [&](auto t_tag) {
      using TS = std::remove_const_t<std::remove_pointer_t<decltype(s_tag)>>;
      using TT = std::remove_const_t<std::remove_pointer_t<decltype(t_tag)>>;
      jsd_range(static_cast<const TS*>(p.student) + p.student_rows.offset(row) + c0,
                static_cast<const TT*>(p.teacher) + p.teacher_rows.offset(row) + c0, c1 - c0,
                p.inv_temperature, lse_t, lse_s, p.beta, sum_p, sum_q);
      return 0;
    });
  });
}

template <int kDiv, class TS, class TT>
void backward_dispatch_hard(const KdLossParams& p, const TS* s, const TT* t, TS* g, int64_t n, int64_t c0,
                            const KdRowGrad& r) {
  if (!p.has_hard()) backward_range<kDiv, 0>(s, t, g, n, c0, r, p.inv_temperature, p.beta);
  else if (p.separate_hard_lse()) backward_range<kDiv, 1>(s, t, g, n, c0, r, p.inv_temperature, p.beta);
  else backward_range<kDiv, 2>(s, t, g, n, c0, r, p.inv_temperature, p.beta);
}

void kd_row_backward(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, const KdRowGrad& r, void* grad) {
  with_dtype(p.student_dtype, [&](auto s_tag) {
    return with_dtype(p.teacher_dtype, [&](auto t_tag) {
      using TS = std::remove_const_t<std::remove_pointer_t<decltype(s_tag)>>;
      using TT = std::remove_const_t<std::remove_pointer_t<decltype(t_tag)>>;
      const TS* s = static_cast<const TS*>(p.student) + p.student_rows.offset(row) + c0;
      const TT* t = static_cast<const TT*>(p.teacher) + p.teacher_rows.offset(row) + c0;
      TS* g = static_cast<TS*>(grad) + row * p.vocab + c0;
      switch (p.divergence) {
        case Divergence::forward_kl: backward_dispatch_hard<0>(p, s, t, g, c1 - c0, c0, r); break;
        case Divergence::reverse_kl: backward_dispatch_hard<1>(p, s, t, g, c1 - c0, c0, r); break;
        default: backward_dispatch_hard<2>(p, s, t, g, c1 - c0, c0, r); break;
      }
      return 0;
    });
  });
}

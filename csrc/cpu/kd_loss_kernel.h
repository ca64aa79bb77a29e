// The fused distillation loss, written once over the vector interface of csrc/cpu/simd/*.h and
// instantiated per ISA by kd_loss_{avx512,avx2,scalar}.cpp inside namespace fastdistill::cpu::<isa>.
// Deliberately no include guard and no includes: see csrc/cpu/simd/prelude.h.

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Rows are processed in blocks that stay in L1 between the block's max pass and its sum pass, so
// the running maxima move once per block, not once per element (one exp per element, not two).
constexpr int64_t kBlock = kKdBlock;
// Exponentials are taken base 2 with log2(e) folded into 1/T, which saves the range reduction's
// multiply and its two-constant subtraction per element; sums of exp are the same numbers, and
// log-domain quantities are converted back with ln 2 once per row.
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// Elements [i, i + kLanes) of p[0, n); lanes past n hold `fill`.
template <class T>
inline VecF load_or(const T* p, int64_t i, int64_t n, float fill) {
  return n - i >= kLanes ? vload(p + i) : vload_tail(p + i, int(n - i), fill);
}

template <class T>
inline VecF load_or_neg_inf(const T* p, int64_t i, int64_t n) {
  return load_or(p, i, n, kNegInf);
}

// The hard term's -hard at the label column, lane `lane` of gv.
inline VecF subtract_at_lane(VecF gv, int64_t lane, float v) {
  alignas(64) float lanes[kLanes];
  std::memcpy(lanes, &gv, sizeof(lanes));
  lanes[lane] -= v;
  std::memcpy(&gv, lanes, sizeof(lanes));
  return gv;
}

template <class T>
inline void store_upto(T* p, int64_t i, int64_t n, VecF x) {
  if (n - i >= kLanes) vstore(p + i, x);
  else vstore_tail(p + i, x, int(n - i));
}

// Pairs of vectors (2 * kLanes columns) in natural order; the ISA header overloads these where another
// lane order is cheaper (bf16: even / odd columns). pair_lane maps a column of the pair to its lane.
template <class T>
inline void vload2(const T* p, VecF& a, VecF& b) {
  a = vload(p);
  b = vload(p + kLanes);
}
template <class T>
inline void vstore2(T* p, VecF a, VecF b) {
  vstore(p, a);
  vstore(p + kLanes, b);
}
template <class T>
inline void vstream2(T* p, VecF a, VecF b) {
  vstream(p, a);
  vstream(p + kLanes, b);
}
template <class T>
constexpr int pair_lane(const T*, int j) { return j; }

// Student and teacher pairs line up only if both types use the same lane order (a mixed-dtype pair such
// as bf16 student and fp32 teacher goes one vector at a time).
template <class TS, class TT>
constexpr bool kSamePairOrder = pair_lane(static_cast<const TS*>(nullptr), 1) == pair_lane(static_cast<const TT*>(nullptr), 1);

// The cache lines of a pair's columns, into L2 (for reading, or with kWrite for writing).
template <int kWrite, class T>
inline void prefetch_pair(const T* p) {
  for (int b = 0; b < int(2 * kLanes * sizeof(T)); b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + b, kWrite, 2);
}

// Where a block [c0, c1)'s whole pairs end: columns [c0, pairs_end) go in pairs, the rest one vector at a
// time. The statistics pass and the cached gradient pass split alike, so the cache's lane order matches.
inline int64_t pairs_end(int64_t c0, int64_t c1, bool pairs = true) {
  return pairs ? c0 + (c1 - c0) / (2 * kLanes) * (2 * kLanes) : c0;
}

// kW: 0 = no weighted sum (JSD first pass), 1 = teacher primary (forward KL), 2 = student primary.
// With `cache` (fused training path, whole rows) what the gradient pass needs is kept: cache[0, n) =
// 2^ua (teacher; reverse KL: ub - ua instead), cache[n, 2n) = 2^ub (student), and per block the reference
// maxima they are relative to, cache[2n + 2b] (teacher) and cache[2n + 2b + 1] (student).
template <int kW, bool kHard, class TS, class TT>
KdPartial stats_range(const TS* s, const TT* t, int64_t n, float inv_t, float* cache = nullptr,
                      TS* grad_ahead = nullptr) {
  const float inv_t2 = inv_t * kLog2e;
  const VecF zero = vset1(0.f), vinv2 = vset1(inv_t2), vlog2e = vset1(kLog2e);
  VecF zt = zero, zs = zero, zh = zero, w = zero;
  float m_t = kNegInf, m_s = kNegInf;
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t c1 = std::min(n, c0 + kBlock), cp = pairs_end(c0, c1, kSamePairOrder<TS, TT>);
    VecF bt = vset1(kNegInf), bs = vset1(kNegInf);
    for (int64_t c = c0; c < cp; c += 2 * kLanes) {
      VecF a, b;
      vload2(t + c, a, b);
      bt = vmax(bt, vmax(a, b));
      vload2(s + c, a, b);
      bs = vmax(bs, vmax(a, b));
    }
    for (int64_t c = cp; c < c1; c += kLanes) {
      bt = vmax(bt, load_or_neg_inf(t, c, c1));
      bs = vmax(bs, load_or_neg_inf(s, c, c1));
    }
    const float nt = std::max(m_t, vmaxall(bt)), ns = std::max(m_s, vmaxall(bs));
    if (nt > m_t || ns > m_s) {
      if (kW == 1 && m_t != kNegInf) {
        const float d = ((nt - m_t) - (m_s == kNegInf ? 0.f : ns - m_s)) * inv_t2;
        w = (w - vset1(d) * zt) * vset1(kd_rescale(m_t, nt, inv_t));
      } else if (kW == 2 && m_s != kNegInf) {
        const float d = ((ns - m_s) - (m_t == kNegInf ? 0.f : nt - m_t)) * inv_t2;
        w = (w - vset1(d) * zs) * vset1(kd_rescale(m_s, ns, inv_t));
      }
      zt = zt * vset1(kd_rescale(m_t, nt, inv_t));
      zs = zs * vset1(kd_rescale(m_s, ns, inv_t));
      if (kHard) zh = zh * vset1(kd_rescale(m_s, ns, 1.f));
      m_t = nt;
      m_s = ns;
    }
    // A block whose maxima are still -inf holds only -inf: any finite reference gives exp(.) = 0.
    const VecF rt = vset1(m_t == kNegInf ? 0.f : m_t), rs = vset1(m_s == kNegInf ? 0.f : m_s);
    if (cache) {
      cache[2 * n + 2 * (c0 / kBlock)] = m_t;
      cache[2 * n + 2 * (c0 / kBlock) + 1] = m_s;
    }
    // Columns whose lanes start at cache position c (in the pair order for [c0, cp)).
    auto accumulate = [&](VecF sv, VecF tv, int64_t c) {
      const VecF ds = sv - rs;
      const VecF ua = (tv - rt) * vinv2, ub = ds * vinv2;  // log2 units
      const VecF ea = vexp2(ua), eb = vexp2(ub);
      if (cache) {
        store_upto(cache, c, c1, kW == 2 ? ub - ua : ea);
        store_upto(cache + n, c, c1, eb);
      }
      zt = zt + ea;
      zs = zs + eb;
      // Terms with zero probability are skipped, not multiplied: their log ratio may be -inf or NaN.
      if (kW == 1) w = vfma_if(vgt(ea, zero), ea, ua - ub, w);
      if (kW == 2) w = vfma_if(vgt(eb, zero), eb, ub - ua, w);
      if (kHard) zh = zh + vexp2(ds * vlog2e);
    };
    // The max pass of the next block (or, for contiguous rows, of the next row) would wait on memory
    // with nothing to compute; fetching it into L2 during this compute-bound pass overlaps the two.
    // The gradient row the caller writes next is fetched for writing. The single-vector loop prefetches
    // too (a pair's lines every other vector): mixed-order dtype pairs take it for whole rows.
    const int64_t ahead = c1 - c0;
    for (int64_t c = c0; c < cp; c += 2 * kLanes) {
      prefetch_pair<0>(s + c + ahead);
      prefetch_pair<0>(t + c + ahead);
      if (grad_ahead) prefetch_pair<1>(grad_ahead + c);
      VecF sa, sb, ta, tb;
      vload2(s + c, sa, sb);
      vload2(t + c, ta, tb);
      accumulate(sa, ta, c);
      accumulate(sb, tb, c + kLanes);
    }
    for (int64_t c = cp; c < c1; c += kLanes) {
      if ((c - cp) % (2 * kLanes) == 0) {
        prefetch_pair<0>(s + c + ahead);
        prefetch_pair<0>(t + c + ahead);
        if (grad_ahead) prefetch_pair<1>(grad_ahead + c);
      }
      accumulate(load_or_neg_inf(s, c, c1), load_or_neg_inf(t, c, c1), c);
    }
  }
  KdPartial out;
  out.m_t = m_t;
  out.z_t = vsum(zt);
  out.m_s = m_s;
  out.z_s = vsum(zs);
  out.z_h = vsum(zh);
  out.w = vsum(w) * kLn2;
  return out;
}

// log2 M for the JSD mixture from la = log2 p, lb = log2 q: log2(2^(la + log2 beta) + 2^(lb + log2(1-beta))).
inline VecF jsd_log2_m(VecF la, VecF lb, VecF log2_beta, VecF log2_1m_beta) {
  const VecF x = la + log2_beta, y = lb + log2_1m_beta;
  return vmax(x, y) + vlog2_1p01(vexp2(vset1(0.f) - vabs(x - y)));
}

// Per-row constants of the log2-domain log-softmax: log2 p = (t - m_t) * c - lz_t * log2(e), c = log2(e) / T.
struct Log2Softmax {
  VecF inv2, m_t, lz_t, m_s, lz_s;
  Log2Softmax(const KdRowGrad& r, float inv_t)
      : inv2(vset1(inv_t * kLog2e)), m_t(vset1(r.m_t)), lz_t(vset1(r.lz_t * kLog2e)), m_s(vset1(r.m_s)),
        lz_s(vset1(r.lz_s * kLog2e)) {}
};

// JSD second pass: sums of p (log p - log M) and q (log q - log M) over a column range. With `cache`
// (fused training path) it also keeps what the gradient needs: cache[0, n) = q, cache[n, 2n) = log2 q -
// log2 M, the same floats backward_range would compute, so the cached gradient is bit-identical.
template <class TS, class TT>
void jsd_range(const TS* s, const TT* t, int64_t n, float inv_t, const KdRowGrad& r, float beta,
               float* sum_p, float* sum_q, float* cache = nullptr) {
  const Log2Softmax ls(r, inv_t);
  const VecF zero = vset1(0.f), lbeta = vset1(std::log2(beta)), l1mb = vset1(std::log2(1.f - beta));
  VecF sp = zero, sq = zero;
  for (int64_t c = 0; c < n; c += kLanes) {
    const VecF la = vfma(load_or_neg_inf(t, c, n) - ls.m_t, ls.inv2, zero - ls.lz_t);
    const VecF lb = vfma(load_or_neg_inf(s, c, n) - ls.m_s, ls.inv2, zero - ls.lz_s);
    const VecF p = vexp2(la), q = vexp2(lb), lm = jsd_log2_m(la, lb, lbeta, l1mb);
    if (cache) {
      store_upto(cache, c, n, q);
      store_upto(cache + n, c, n, lb - lm);
    }
    sp = vfma_if(vgt(p, zero), p, la - lm, sp);
    sq = vfma_if(vgt(q, zero), q, lb - lm, sq);
  }
  *sum_p = vsum(sp) * kLn2;
  *sum_q = vsum(sq) * kLn2;
}

// kHard: 0 = none, 1 = softmax(student) at T = 1 computed separately, 2 = it equals q (T == 1).
// `col0` is the column of s[0] within the row (for the label position).
template <int kDiv, int kHard, class TS, class TT>
void backward_range(const TS* s, const TT* t, TS* g, int64_t n, int64_t col0, const KdRowGrad& r,
                    float inv_t, float beta, bool stream) {
  const Log2Softmax ls(r, inv_t);
  const VecF zero = vset1(0.f), vlog2e = vset1(kLog2e), vlzh = vset1(r.lz_h * kLog2e), vhard = vset1(r.hard);
  // d/db of reverse KL and JSD is a log-domain expression: its ln 2 goes into the coefficient.
  const VecF vsoft = vset1(kDiv == 0 ? r.soft : kDiv == 1 ? r.soft * kLn2 : r.soft * (1.f - beta) * kLn2);
  const VecF vaux = vset1(r.aux * kLog2e);
  const VecF lbeta = vset1(kDiv == 2 ? std::log2(beta) : 0.f), l1mb = vset1(kDiv == 2 ? std::log2(1.f - beta) : 0.f);
  const int64_t label = r.label - col0;  // label column relative to this range
  for (int64_t c = 0; c < n; c += kLanes) {
    const VecF ds = load_or_neg_inf(s, c, n) - ls.m_s;
    const VecF la = vfma(load_or_neg_inf(t, c, n) - ls.m_t, ls.inv2, zero - ls.lz_t);
    const VecF lb = vfma(ds, ls.inv2, zero - ls.lz_s);
    const VecF q = vexp2(lb);
    VecF gv;
    if (kDiv == 0) {
      gv = vsoft * (q - vexp2(la));
    } else if (kDiv == 1) {
      gv = vsoft * vselect(vgt(q, zero), q * (lb - la - vaux), zero);
    } else {
      gv = vsoft * vselect(vgt(q, zero), q * (lb - jsd_log2_m(la, lb, lbeta, l1mb) - vaux), zero);
    }
    if (kHard == 1) gv = vfma(vhard, vexp2(vfma(ds, vlog2e, zero - vlzh)), gv);
    if (kHard == 2) gv = vfma(vhard, q, gv);
    if (kHard != 0 && label >= c && label < c + kLanes) gv = subtract_at_lane(gv, label - c, r.hard);
    if (stream && n - c >= kLanes) vstream(g + c, gv);
    else store_upto(g, c, n, gv);
  }
  if (stream) vstream_fence();
}

// Lanes [c, c + kLanes) of a whole row's gradient: the hard term's -hard at the label column, then the
// store (streamed past the cache, or plain at the row's tail).
template <bool kHard, class TS>
inline void put_gradient(TS* g, int64_t c, int64_t n, VecF gv, const KdRowGrad& r, bool stream) {
  if (kHard && r.label >= c && r.label < c + kLanes) gv = subtract_at_lane(gv, r.label - c, r.hard);
  if (stream && n - c >= kLanes) vstream(g + c, gv);
  else store_upto(g, c, n, gv);
}

// The same for a pair of vectors (columns [c, c + 2 * kLanes) in vload2's lane order).
template <bool kHard, class TS>
inline void put_gradient2(TS* g, int64_t c, VecF a, VecF b, const KdRowGrad& r, bool stream) {
  if (kHard && r.label >= c && r.label < c + 2 * kLanes) {
    const int lane = pair_lane(g, int(r.label - c));
    if (lane < kLanes) a = subtract_at_lane(a, lane, r.hard);
    else b = subtract_at_lane(b, lane - kLanes, r.hard);
  }
  if (stream) vstream2(g + c, a, b);
  else vstore2(g + c, a, b);
}

// Columns [c0, c1) of a whole row's gradient, grad_at(c) giving the vector at cache position c: pairs in
// the statistics pass's lane order up to pairs_end, then single vectors (the split stats_range made).
template <bool kHard, class TS, class F>
inline void put_block(TS* g, int64_t c0, int64_t c1, int64_t n, const F& grad_at, const KdRowGrad& r, bool stream,
                      bool pairs) {
  const int64_t cp = pairs_end(c0, c1, pairs);
  for (int64_t c = c0; c < cp; c += 2 * kLanes) put_gradient2<kHard>(g, c, grad_at(c), grad_at(c + kLanes), r, stream);
  for (int64_t c = cp; c < c1; c += kLanes) put_gradient<kHard>(g, c, n, grad_at(c), r, stream);
}

// Forward KL gradient of a whole row from the exponentials its statistics pass cached: per block, p and q
// are the cached 2^u times one scalar, so this pass does no exp and reads no logits. kHardQ: the hard
// term's softmax is q (T == 1), folded into q's factor. Rows that are entirely -inf do not come here.
template <bool kHardQ, class TS>
void backward_cached_range(const float* cache, TS* g, int64_t n, const KdRowGrad& r, float inv_t, bool stream,
                           bool pairs) {
  const float* et = cache;
  const float* es = cache + n;
  const float* refs = cache + 2 * n;
  const float c2 = inv_t * kLog2e;
  const float wq = kHardQ ? r.soft + r.hard : r.soft;
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t c1 = std::min(n, c0 + kBlock), b = c0 / kBlock;
    // A block cached while its running max was -inf holds only zeros.
    const float ft = refs[2 * b] == kNegInf ? 0.f : r.soft * std::exp2((refs[2 * b] - r.m_t) * c2 - r.lz_t * kLog2e);
    const float fs = refs[2 * b + 1] == kNegInf ? 0.f : wq * std::exp2((refs[2 * b + 1] - r.m_s) * c2 - r.lz_s * kLog2e);
    const VecF vft = vset1(-ft), vfs = vset1(fs);
    auto grad_at = [&](int64_t c) { return vfma(load_or(es, c, n, 0.f), vfs, load_or(et, c, n, 0.f) * vft); };
    put_block<kHardQ>(g, c0, c1, n, grad_at, r, stream, pairs);
  }
  if (stream) vstream_fence();
}

// Reverse KL gradient of a whole row from the statistics pass's cache (ub - ua and 2^ub per column): per
// block q = 2^ub times one scalar and lb - la = (ub - ua) plus one scalar, so no exp and no logits re-read.
template <bool kHardQ, class TS>
void backward_rkl_cached_range(const float* cache, TS* g, int64_t n, const KdRowGrad& r, float inv_t, bool stream,
                               bool pairs) {
  const float* d = cache;
  const float* es = cache + n;
  const float* refs = cache + 2 * n;
  const float c2 = inv_t * kLog2e;
  const VecF zero = vset1(0.f), vsoft = vset1(r.soft * kLn2), vhard = vset1(r.hard);
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t c1 = std::min(n, c0 + kBlock), b = c0 / kBlock;
    const float rt = refs[2 * b], rs = refs[2 * b + 1];
    // A -inf reference means the block was cached against 0 and holds only -inf logits: q = 0 for the
    // student; for the teacher ub - ua is +inf, which any finite offset keeps.
    const float fs = rs == kNegInf ? 0.f : std::exp2((rs - r.m_s) * c2 - r.lz_s * kLog2e);
    const float kt = rt == kNegInf ? 0.f : (rt - r.m_t) * c2 - r.lz_t * kLog2e;
    const float ks = rs == kNegInf ? 0.f : (rs - r.m_s) * c2 - r.lz_s * kLog2e;
    const VecF vfs = vset1(fs), vk = vset1(ks - kt - r.aux * kLog2e);
    auto grad_at = [&](int64_t c) {
      const VecF q = load_or(es, c, n, 0.f) * vfs;
      const VecF gv = vsoft * vselect(vgt(q, zero), q * (load_or(d, c, n, 0.f) + vk), zero);
      return kHardQ ? vfma(vhard, q, gv) : gv;
    };
    put_block<kHardQ>(g, c0, c1, n, grad_at, r, stream, pairs);
  }
  if (stream) vstream_fence();
}

// JSD gradient of a whole row from jsd_range's cache (q and log2 q - log2 M): no exp, no log, no logits
// re-read. Same expression as backward_range<2, kHardQ ? 2 : 0>.
template <bool kHardQ, class TS>
void backward_jsd_cached_range(const float* cache, TS* g, int64_t n, const KdRowGrad& r, float beta, bool stream) {
  const VecF zero = vset1(0.f), vsoft = vset1(r.soft * (1.f - beta) * kLn2), vaux = vset1(r.aux * kLog2e);
  const VecF vhard = vset1(r.hard);
  for (int64_t c = 0; c < n; c += kLanes) {
    const VecF q = load_or(cache, c, n, 0.f), d = load_or(cache + n, c, n, 0.f);
    VecF gv = vsoft * vselect(vgt(q, zero), q * (d - vaux), zero);
    if (kHardQ) gv = vfma(vhard, q, gv);
    put_gradient<kHardQ>(g, c, n, gv, r, stream);
  }
  if (stream) vstream_fence();
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

void kd_row_jsd(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, const KdRowGrad& lse, float* sum_p,
                float* sum_q, float* cache) {
  with_dtype(p.student_dtype, [&](auto s_tag) {
    return with_dtype(p.teacher_dtype, [&](auto t_tag) {
      using TS = std::remove_const_t<std::remove_pointer_t<decltype(s_tag)>>;
      using TT = std::remove_const_t<std::remove_pointer_t<decltype(t_tag)>>;
      jsd_range(static_cast<const TS*>(p.student) + p.student_rows.offset(row) + c0,
                static_cast<const TT*>(p.teacher) + p.teacher_rows.offset(row) + c0, c1 - c0,
                p.inv_temperature, lse, p.beta, sum_p, sum_q, cache);
      return 0;
    });
  });
}

// Stream the gradient past the cache when it is far larger than the cache and the range is aligned.
template <class TS>
bool stream_gradient(const KdLossParams& p, const TS* g) {
  constexpr int64_t kStreamBytes = int64_t(64) << 20;
  return p.rows * p.vocab * int64_t(sizeof(TS)) >= kStreamBytes &&
         reinterpret_cast<uintptr_t>(g) % (kLanes * sizeof(TS)) == 0;
}

template <int kDiv, class TS, class TT>
void backward_dispatch_hard(const KdLossParams& p, const TS* s, const TT* t, TS* g, int64_t n, int64_t c0,
                            const KdRowGrad& r) {
  const bool stream = stream_gradient(p, g);
  if (!p.has_hard()) backward_range<kDiv, 0>(s, t, g, n, c0, r, p.inv_temperature, p.beta, stream);
  else if (p.separate_hard_lse()) backward_range<kDiv, 1>(s, t, g, n, c0, r, p.inv_temperature, p.beta, stream);
  else backward_range<kDiv, 2>(s, t, g, n, c0, r, p.inv_temperature, p.beta, stream);
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

KdPartial kd_row_stats_cached(const KdLossParams& p, int64_t row, float* cache, void* grad) {
  return with_dtype(p.student_dtype, [&](auto s_tag) {
    return with_dtype(p.teacher_dtype, [&](auto t_tag) {
      using TS = std::remove_const_t<std::remove_pointer_t<decltype(s_tag)>>;
      using TT = std::remove_const_t<std::remove_pointer_t<decltype(t_tag)>>;
      const TS* s = static_cast<const TS*>(p.student) + p.student_rows.offset(row);
      const TT* t = static_cast<const TT*>(p.teacher) + p.teacher_rows.offset(row);
      // The gradient row is written right after this pass: unless it will be streamed, fetch it for writing
      // now, while the pass is compute-bound, so the stores do not wait on read-for-ownership misses.
      TS* g = static_cast<TS*>(grad) + row * p.vocab;
      TS* ahead = stream_gradient(p, g) ? nullptr : g;
      return p.divergence == Divergence::reverse_kl ? stats_range<2, false>(s, t, p.vocab, p.inv_temperature, cache, ahead)
                                                    : stats_range<1, false>(s, t, p.vocab, p.inv_temperature, cache, ahead);
    });
  });
}

// The gradient of a whole row from its training-path cache: kd_row_stats_cached's (forward / reverse KL)
// or kd_row_jsd's (JSD).
void kd_row_backward_cached(const KdLossParams& p, int64_t row, const KdRowGrad& r, const float* cache, void* grad) {
  with_dtype(p.student_dtype, [&](auto s_tag) {
    using TS = std::remove_const_t<std::remove_pointer_t<decltype(s_tag)>>;
    TS* g = static_cast<TS*>(grad) + row * p.vocab;
    const bool stream = stream_gradient(p, g), hard = p.has_hard();
    const bool pairs = with_dtype(p.teacher_dtype, [](auto t_tag) {  // as stats_range split the row
      return kSamePairOrder<TS, std::remove_const_t<std::remove_pointer_t<decltype(t_tag)>>>;
    });
    switch (p.divergence) {
      case Divergence::jsd:
        if (hard) backward_jsd_cached_range<true>(cache, g, p.vocab, r, p.beta, stream);
        else backward_jsd_cached_range<false>(cache, g, p.vocab, r, p.beta, stream);
        break;
      case Divergence::reverse_kl:
        if (hard) backward_rkl_cached_range<true>(cache, g, p.vocab, r, p.inv_temperature, stream, pairs);
        else backward_rkl_cached_range<false>(cache, g, p.vocab, r, p.inv_temperature, stream, pairs);
        break;
      default:
        if (hard) backward_cached_range<true>(cache, g, p.vocab, r, p.inv_temperature, stream, pairs);
        else backward_cached_range<false>(cache, g, p.vocab, r, p.inv_temperature, stream, pairs);
    }
    return 0;
  });
}

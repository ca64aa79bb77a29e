// 2:4 sparse kernels, avx512 level.
//
// Float values (fp32 / bf16 / fp16): one chunk = 32 columns = 16 kept values = 4 meta bytes. The 32-bit meta word expands to
// 16 gather indices with one variable shift (value j: bits 2j..2j+1, plus group base 4 * (j / 2));
// vpermt2ps then gathers the 16 activations the kept values need out of the 32 columns held in two
// registers. A 4 (rows of W) x 4 (rows of x) register tile decodes each index vector once and
// reuses it for 4 activation rows, and loads each activation chunk once for 4 weight rows, so the
// inner loop is one permute + one FMA per 16 useful multiply-adds (half the dense FMA count).
// Large M is blocked over M and K so the activation block stays in L2 and the weight tile in L1.
//
// int8: one chunk = 128 columns = 64 kept values = 16 meta bytes. vpmovzxwq + vpmultishiftqb expand
// the 2-bit indices to 64 byte indices, vpermi2b gathers 64 activation bytes, vpdpbusd multiplies
// them (as u8 = x + 128) with the int8 values; the +128 is removed with the row sum of the values.
#include "cpu/simd/prelude.h"
#include "cpu/sparse24_kernels.h"

#include <array>
#include <vector>

#if defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
FASTDISTILL_TARGET_AVX512

namespace fastdistill::cpu::sparse24::avx512 {

namespace {

constexpr int kNB = 4;  // weight rows per register tile
constexpr int kMB = 4;  // activation rows per register tile
// Large M: K block of 128 groups (512 columns x 64 rows x 4 B = 128 KB of xt, L2-resident); smaller blocks
// cost more scratch traffic.
constexpr int64_t kKbg = 128;

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 16 gather indices (0..31) for the 16 kept values of a 32-column chunk.
inline __m512i decode16(uint32_t meta) {
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  return _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(meta)), shift),
                                          _mm512_set1_epi32(3)),
                         base);
}

template <class V>
inline __m512 load_values(const void* values, int64_t off, __mmask16 mask) {
  if constexpr (std::is_same_v<V, float>) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(values) + off);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(values) + off);
    if constexpr (std::is_same_v<V, bf16_t>) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// Lane l of the result is the horizontal sum of v[l].
inline __m512 reduce16(const __m512* v) {
  __m512 u[4];
  for (int q = 0; q < 4; ++q) {
    const __m512* a = v + 4 * q;
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    const __m512d d01 = _mm512_castps_pd(t01), d23 = _mm512_castps_pd(t23);
    u[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

template <int NB, int MB>
__attribute__((always_inline)) inline void micro_step(__m512* acc, const __m512i* idx, const __m512* w, const float* x,
                                                      int64_t ldx, int64_t c) {
  _Pragma("GCC unroll 16") for (int j = 0; j < MB; ++j) {
    const __m512 xa = _mm512_loadu_ps(x + j * ldx + 32 * c);
    const __m512 xb = _mm512_loadu_ps(x + j * ldx + 32 * c + 16);
    _Pragma("GCC unroll 16") for (int i = 0; i < NB; ++i)
      acc[j * NB + i] = _mm512_fmadd_ps(_mm512_permutex2var_ps(xa, idx[i], xb), w[i], acc[j * NB + i]);
  }
}

// out[m..m+MB, n..n+NB] += x[m.., chunks c0..c1) . W[n.., chunks c0..c1)^T. The chunk c1 - 1 may be
// the partial last chunk (tail_vals values, tail_bytes meta bytes), read with masked loads; it is
// handled outside the main loop so that the accumulators stay in registers.
template <int NB, int MB, class V>
void micro(const FloatParams& p, int64_t n, int64_t m, int64_t c0, int64_t c1, int64_t nfull) {
  const int64_t half = p.K / 2, mbytes = (p.K + 7) / 8;
  __m512 acc[MB * NB];
  _Pragma("GCC unroll 16") for (int t = 0; t < MB * NB; ++t) acc[t] = _mm512_setzero_ps();
  const float* x = p.x + m * p.ldx;
  const int64_t cf = std::min(c1, nfull);
  for (int64_t c = c0; c < cf; ++c) {
    __m512i idx[NB];
    __m512 w[NB];
    _Pragma("GCC unroll 16") for (int i = 0; i < NB; ++i) {
      idx[i] = decode16(load_u32(p.meta + (n + i) * mbytes + 4 * c));
      w[i] = load_values<V>(p.values, (n + i) * half + 16 * c, 0xFFFF);
    }
    micro_step<NB, MB>(acc, idx, w, x, p.ldx, c);
  }
  if (c1 > nfull && c1 - 1 >= c0) {  // partial last chunk
    const int64_t c = c1 - 1;
    const int64_t tail_vals = half - 16 * c, tail_bytes = mbytes - 4 * c;
    const __mmask16 mask = __mmask16((1u << tail_vals) - 1);
    __m512i idx[NB];
    __m512 w[NB];
    for (int i = 0; i < NB; ++i) {
      uint32_t mw = 0;
      std::memcpy(&mw, p.meta + (n + i) * mbytes + 4 * c, size_t(tail_bytes));
      idx[i] = decode16(mw);
      w[i] = load_values<V>(p.values, (n + i) * half + 16 * c, mask);
    }
    micro_step<NB, MB>(acc, idx, w, x, p.ldx, c);
  }
  if constexpr (NB == 4 && MB == 4) {
    alignas(64) float s[16];
    _mm512_store_ps(s, reduce16(acc));
    for (int j = 0; j < 4; ++j) {
      float* o = p.out + (m + j) * p.ldo + n;
      _mm_storeu_ps(o, _mm_add_ps(_mm_loadu_ps(o), _mm_load_ps(s + 4 * j)));
    }
  } else {
    for (int j = 0; j < MB; ++j)
      for (int i = 0; i < NB; ++i) p.out[(m + j) * p.ldo + n + i] += _mm512_reduce_add_ps(acc[j * NB + i]);
  }
}

template <int NB, class V>
void micro_m(const FloatParams& p, int64_t n, int64_t m, int mb, int64_t c0, int64_t c1, int64_t nfull) {
  switch (mb) {
    case 4: micro<NB, 4, V>(p, n, m, c0, c1, nfull); break;
    case 3: micro<NB, 3, V>(p, n, m, c0, c1, nfull); break;
    case 2: micro<NB, 2, V>(p, n, m, c0, c1, nfull); break;
    default: micro<NB, 1, V>(p, n, m, c0, c1, nfull); break;
  }
}

template <class V>
void tile(const FloatParams& p, int64_t n, int nb, int64_t m, int mb, int64_t c0, int64_t c1, int64_t nfull) {
  switch (nb) {
    case 4: micro_m<4, V>(p, n, m, mb, c0, c1, nfull); break;
    case 3: micro_m<3, V>(p, n, m, mb, c0, c1, nfull); break;
    case 2: micro_m<2, V>(p, n, m, mb, c0, c1, nfull); break;
    default: micro_m<1, V>(p, n, m, mb, c0, c1, nfull); break;
  }
}

// Large M: vectorise over 64 activation rows instead of over K. For a 6-row weight tile and one
// 64-row activation block, each kept value (row i, column k) does acc[i][0..3] += w * xt[k][0..63]:
// one broadcast and 4 FMAs with memory operands, no shuffles. K is blocked so the xt slice stays in
// L2; partial sums live in a per-call scratch [rows][64].
//
// vals / meta point at group g0 of the tile's first row; row i's are at + i * vstride floats / i * mstride
// bytes. Rows 0-2 and 3-5 are addressed from two bases, and groups go in pairs (one meta byte per row):
// with 12 separate row pointers GCC parked GPRs in vector registers, and those vmovq moves took FMA
// ports (~8% of the tile).
template <int NB>
void xt_tile(const float* vals, int64_t vstride, const uint8_t* meta, int64_t mstride, const float* xt, int64_t g0,
             int64_t g1, float* scratch) {
  constexpr int64_t kRowBytes = kXtRows * 4;
  __m512 acc[NB][4];
  _Pragma("GCC unroll 8") for (int i = 0; i < NB; ++i)
    _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_loadu_ps(scratch + i * kXtRows + 16 * v);
  const float* vbase[2] = {vals, vals + 3 * vstride};
  const uint8_t* mbase[2] = {meta, meta + 3 * mstride};
  const char* xg = reinterpret_cast<const char*>(xt + 4 * g0 * kXtRows);
  // acc[i] += the group's two kept values (code: its nibble, v: its value pair) times their xt rows.
  auto group = [&](int i, uint32_t code, const char* xb, const float* v) {
    const float* r0 = reinterpret_cast<const float*>(xb + (code & 3) * kRowBytes);
    const float* r1 = reinterpret_cast<const float*>(xb + (code >> 2 & 3) * kRowBytes);
    // Materialise the row pointers: a base + index memory operand would un-laminate each FMA.
    asm("" : "+r"(r0), "+r"(r1));
    const __m512 w0 = _mm512_set1_ps(v[0]), w1 = _mm512_set1_ps(v[1]);
    _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q) {
      acc[i][q] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r0 + 16 * q), acc[i][q]);
      acc[i][q] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(r1 + 16 * q), acc[i][q]);
    }
  };
  int64_t g = g0;
  for (; g + 2 <= g1; g += 2) {
    _Pragma("GCC unroll 8") for (int i = 0; i < NB; ++i) {
      const float* v = vbase[i / 3] + (i % 3) * vstride;
      const uint32_t byte = mbase[i / 3][(i % 3) * mstride];
      group(i, byte & 15u, xg, v);
      group(i, byte >> 4, xg + 4 * kRowBytes, v + 2);
    }
    _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h) vbase[h] += 4, mbase[h] += 1;
    xg += 8 * kRowBytes;
  }
  if (g < g1) {  // an odd last group: the low nibble
    _Pragma("GCC unroll 8") for (int i = 0; i < NB; ++i)
      group(i, mbase[i / 3][(i % 3) * mstride] & 15u, xg, vbase[i / 3] + (i % 3) * vstride);
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < NB; ++i)
    _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v) _mm512_storeu_ps(scratch + i * kXtRows + 16 * v, acc[i][v]);
}

// dst[i * len + j] = src[i * stride + j] as fp32, for rows i < rows and j < len (16-bit values).
template <class V>
void widen_rows(const V* src, int64_t stride, int rows, int64_t len, float* dst) {
  for (int i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 m = len - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - j)) - 1);
      _mm512_mask_storeu_ps(dst + i * len + j, m, load_values<V>(src + i * stride, j, m));
    }
  }
}

// In-register 16x16 transpose: r[i] lane j <- r[j] lane i (unpack pairs, then 128-bit lane shuffles).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// out[r][j] += scratch[j * kXtRows + r] for r < mrows, j < ncols, 16 x 16 blocks at a time (a scalar loop
// with a 256-byte stride took ~10% of a K = 768 call).
void add_transposed(const float* scratch, int64_t ncols, int64_t mrows, float* out, int64_t ldo) {
  int64_t j = 0;
  for (; j + 16 <= ncols; j += 16) {
    for (int64_t r0 = 0; r0 < mrows; r0 += 16) {
      __m512 t[16];
      for (int q = 0; q < 16; ++q) t[q] = _mm512_loadu_ps(scratch + (j + q) * kXtRows + r0);
      transpose16(t);
      for (int q = 0; q < 16 && r0 + q < mrows; ++q) {
        float* o = out + (r0 + q) * ldo + j;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), t[q]));
      }
    }
  }
  for (; j < ncols; ++j)
    for (int64_t r = 0; r < mrows; ++r) out[r * ldo + j] += scratch[j * kXtRows + r];
}

template <class V>
void float_linear_xt(const FloatParams& p, int64_t n0, int64_t n1) {
  constexpr int kRows = 6;
  const int64_t groups = p.K / 4, kbg = kKbg, half = p.K / 2, mstride = (p.K + 7) / 8;
  const int64_t rows = n1 - n0;
  std::vector<float> scratch(size_t(rows * kXtRows));
  // 16-bit values are widened to fp32 once per tile and K block, not in the tile's inner loop, where each
  // value would cost two shuffle-port µops (move to a vector register, broadcast) beside its 4 FMAs.
  constexpr bool kWiden = !std::is_same_v<V, float>;
  std::vector<float> wide(kWiden ? size_t(kRows * 2 * kbg) : 0);
  for (int64_t mb = 0; mb * kXtRows < p.M; ++mb) {
    const float* xt = p.xt + mb * p.ldx * kXtRows;
    std::fill(scratch.begin(), scratch.end(), 0.f);
    for (int64_t g0 = 0; g0 < groups; g0 += kbg) {
      const int64_t g1 = std::min(groups, g0 + kbg);
      for (int64_t n = n0; n < n1; n += kRows) {
        const int nb = int(std::min<int64_t>(kRows, n1 - n));
        const float* vals = nullptr;
        int64_t vstride = half;
        if constexpr (kWiden) {
          vstride = 2 * (g1 - g0);
          widen_rows(static_cast<const V*>(p.values) + n * half + 2 * g0, half, nb, vstride, wide.data());
          vals = wide.data();
        } else {
          vals = static_cast<const float*>(p.values) + n * half + 2 * g0;
        }
        const uint8_t* meta = p.meta + n * mstride + g0 / 2;  // g0 is even
        float* s = scratch.data() + (n - n0) * kXtRows;
        switch (nb) {
          case 6: xt_tile<6>(vals, vstride, meta, mstride, xt, g0, g1, s); break;
          case 5: xt_tile<5>(vals, vstride, meta, mstride, xt, g0, g1, s); break;
          case 4: xt_tile<4>(vals, vstride, meta, mstride, xt, g0, g1, s); break;
          case 3: xt_tile<3>(vals, vstride, meta, mstride, xt, g0, g1, s); break;
          case 2: xt_tile<2>(vals, vstride, meta, mstride, xt, g0, g1, s); break;
          default: xt_tile<1>(vals, vstride, meta, mstride, xt, g0, g1, s); break;
        }
      }
    }
    add_transposed(scratch.data(), rows, std::min(kXtRows, p.M - mb * kXtRows), p.out + mb * kXtRows * p.ldo + n0,
                   p.ldo);
  }
}

// M = 1 (GEMV): the R weight rows rows[0..R) in one pass over K, 2 accumulators per row, all in
// registers. Software prefetch 1 KB ahead on Intel only: AMD's hardware prefetcher does better alone.
template <int R, class V>
void gemv_rows_r(const FloatParams& p, const int64_t* rows) {
  static const bool prefetch = __builtin_cpu_is("intel");
  const int64_t half = p.K / 2, mbytes = (p.K + 7) / 8;
  const int64_t nfull = half / 16;
  const float* x = p.x;
  __m512 acc[R][2];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 2 <= nfull; c += 2) {
    if (prefetch) {  // 1 KB ahead in the values, 128 B in the meta
      _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
        const char* v = reinterpret_cast<const char*>(p.values) + (rows[r] * half + 16 * c) * sizeof(V);
        _mm_prefetch(v + 1024, _MM_HINT_T0);
        if (sizeof(V) == 4) _mm_prefetch(v + 1024 + 64, _MM_HINT_T0);
        if ((c & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(p.meta + rows[r] * mbytes + 4 * c) + 128, _MM_HINT_T0);
      }
    }
    _Pragma("GCC unroll 2") for (int u = 0; u < 2; ++u) {
      const __m512 xa = _mm512_loadu_ps(x + 32 * (c + u)), xb = _mm512_loadu_ps(x + 32 * (c + u) + 16);
      _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
        const __m512i idx = decode16(load_u32(p.meta + rows[r] * mbytes + 4 * (c + u)));
        const __m512 w = load_values<V>(p.values, rows[r] * half + 16 * (c + u), 0xFFFF);
        acc[r][u] = _mm512_fmadd_ps(_mm512_permutex2var_ps(xa, idx, xb), w, acc[r][u]);
      }
    }
  }
  for (; 16 * c < half; ++c) {  // at most one full chunk and one partial chunk
    const int64_t tail_vals = std::min<int64_t>(16, half - 16 * c), tail_bytes = std::min<int64_t>(4, mbytes - 4 * c);
    const __mmask16 mask = __mmask16((1u << tail_vals) - 1);
    const __m512 xa = _mm512_loadu_ps(x + 32 * c), xb = _mm512_loadu_ps(x + 32 * c + 16);
    for (int r = 0; r < R; ++r) {
      uint32_t mw = 0;
      std::memcpy(&mw, p.meta + rows[r] * mbytes + 4 * c, size_t(tail_bytes));
      const __m512 w = load_values<V>(p.values, rows[r] * half + 16 * c, mask);
      acc[r][0] = _mm512_fmadd_ps(_mm512_permutex2var_ps(xa, decode16(mw), xb), w, acc[r][0]);
    }
  }
  for (int r = 0; r < R; ++r) p.out[rows[r]] += _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

// 8 rows per pass, one from each eighth of the task's rows: 16 sequential streams per core (adjacent rows
// share DRAM pages and stream worse), and each activation load serves 8 rows.
template <class V>
void gemv_rows(const FloatParams& p, int64_t n0, int64_t n1) {
  constexpr int kSegments = 8;
  const int64_t seg = (n1 - n0) / kSegments;  // rows per segment
  for (int64_t i = 0; i < seg; ++i) {
    int64_t rows[kSegments];
    for (int s = 0; s < kSegments; ++s) rows[s] = n0 + s * seg + i;
    gemv_rows_r<kSegments, V>(p, rows);
  }
  for (int64_t n = n0 + kSegments * seg; n < n1; ++n) gemv_rows_r<1, V>(p, &n);
}

template <class V>
void float_linear_t(const FloatParams& p, int64_t n0, int64_t n1) {
  if (p.xt != nullptr) return float_linear_xt<V>(p, n0, n1);
  if (p.M == 1) return gemv_rows<V>(p, n0, n1);
  const int64_t half = p.K / 2;
  const int64_t nfull = half / 16, nchunks = (half + 15) / 16;
  // Small M: one pass over K per tile (the weights stream once). Large M: block so that the
  // activation block (mblk rows x kblk chunks) stays in L2 and the 4-row weight tile in L1.
  const int64_t kblk = p.M <= 16 ? nchunks : 32;
  const int64_t mblk = p.M <= 16 ? p.M : 64;
  for (int64_t mb0 = 0; mb0 < p.M; mb0 += mblk) {
    const int64_t mb1 = std::min(p.M, mb0 + mblk);
    for (int64_t c0 = 0; c0 < nchunks; c0 += kblk) {
      const int64_t c1 = std::min(nchunks, c0 + kblk);
      for (int64_t n = n0; n < n1; n += kNB) {
        const int nb = int(std::min<int64_t>(kNB, n1 - n));
        for (int64_t m = mb0; m < mb1; m += kMB)
          tile<V>(p, n, nb, m, int(std::min<int64_t>(kMB, mb1 - m)), c0, c1, nfull);
      }
    }
  }
}

// ---------------------------------------------------------------- int8
// 64 byte indices (0..127) for the 64 kept values of a 128-column chunk (16 meta bytes).
inline __m512i decode64(__m128i meta) {
  alignas(64) static const uint8_t kBase[64] = {
      0,   0,   4,   4,   8,   8,   12,  12,  16,  16,  20,  20,  24,  24,  28,  28,  32,  32,  36,  36,  40,  40,
      44,  44,  48,  48,  52,  52,  56,  56,  60,  60,  64,  64,  68,  68,  72,  72,  76,  76,  80,  80,  84,  84,
      88,  88,  92,  92,  96,  96,  100, 100, 104, 104, 108, 108, 112, 112, 116, 116, 120, 120, 124, 124};
  const __m512i q = _mm512_cvtepu16_epi64(meta);  // qword i holds the 16 meta bits of values 8i..8i+7
  const __m512i sh = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x0E0C0A0806040200LL), q);
  return _mm512_or_si512(_mm512_and_si512(sh, _mm512_set1_epi8(3)), _mm512_load_si512(kBase));
}

template <int NB, int MB>
void micro_i8(const Int8Params& p, int64_t n, int64_t m, const int32_t* wsum) {
  const int64_t half = p.K / 2, mbytes = (p.K + 7) / 8;
  const int64_t nfull = half / 64, nchunks = (half + 63) / 64;
  __m512i acc[MB * NB];
  _Pragma("GCC unroll 16") for (int t = 0; t < MB * NB; ++t) acc[t] = _mm512_setzero_si512();
  for (int64_t c = 0; c < nchunks; ++c) {
    __m512i idx[NB], w[NB];
    if (c < nfull) {
      _Pragma("GCC unroll 16") for (int i = 0; i < NB; ++i) {
        idx[i] = decode64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.meta + (n + i) * mbytes + 16 * c)));
        w[i] = _mm512_loadu_si512(p.values + (n + i) * half + 64 * c);
      }
    } else {
      const int64_t tail_vals = half - 64 * c, tail_bytes = mbytes - 16 * c;
      const __mmask64 mask = (tail_vals >= 64) ? ~__mmask64(0) : ((__mmask64(1) << tail_vals) - 1);
      _Pragma("GCC unroll 16") for (int i = 0; i < NB; ++i) {
        alignas(16) uint8_t mt[16] = {};
        std::memcpy(mt, p.meta + (n + i) * mbytes + 16 * c, size_t(tail_bytes));
        idx[i] = decode64(_mm_load_si128(reinterpret_cast<const __m128i*>(mt)));
        w[i] = _mm512_maskz_loadu_epi8(mask, p.values + (n + i) * half + 64 * c);
      }
    }
    _Pragma("GCC unroll 16") for (int j = 0; j < MB; ++j) {
      const int8_t* x = p.xq + (m + j) * p.ldx + 128 * c;
      const __m512i xa = _mm512_loadu_si512(x), xb = _mm512_loadu_si512(x + 64);  // u8 = s8 + 128
      _Pragma("GCC unroll 16") for (int i = 0; i < NB; ++i)
        acc[j * NB + i] = _mm512_dpbusd_epi32(acc[j * NB + i], _mm512_permutex2var_epi8(xa, idx[i], xb), w[i]);
    }
  }
  _Pragma("GCC unroll 16") for (int j = 0; j < MB; ++j)
    _Pragma("GCC unroll 16") for (int i = 0; i < NB; ++i) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[j * NB + i]) - 128 * wsum[i];
      p.out[(m + j) * p.ldo + n + i] = int8_epilogue(dot, p.x_scales[m + j], p.w_scales[n + i], p.bias, n + i);
    }
}

template <int NB>
void micro_i8_m(const Int8Params& p, int64_t n, int64_t m, int mb, const int32_t* wsum) {
  switch (mb) {
    case 4: micro_i8<NB, 4>(p, n, m, wsum); break;
    case 3: micro_i8<NB, 3>(p, n, m, wsum); break;
    case 2: micro_i8<NB, 2>(p, n, m, wsum); break;
    default: micro_i8<NB, 1>(p, n, m, wsum); break;
  }
}

int32_t row_sum_i8(const int8_t* v, int64_t len) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(v + i));
  if (i < len) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8((__mmask64(1) << (len - i)) - 1, v + i));
  return _mm512_reduce_add_epi32(acc);
}

// The decompress route (Sparse24Kernels::unpack_int8_panel), 16 weight rows x 16 groups of 4 k at a time: each
// row's 16 value pairs go to their bytes of 16 dwords by one vpermt2b against a zero table, its control bytes
// looked up from the meta nibbles (vpermd on a 16-entry table); a 16 x 16 dword transpose then gives, per group,
// the 16 rows' dwords: one 64-byte line of the packed tile.
constexpr std::array<uint32_t, 16> make_unpack_control() {
  // Byte u of the dword for nibble c = idx0 | idx1 << 2: 1 (the second value) if u == idx1, 0 (the first) if
  // u == idx0, else 64 (the zero table). The scalar level writes the same bytes.
  std::array<uint32_t, 16> t{};
  for (uint32_t c = 0; c < 16; ++c)
    for (uint32_t u = 0; u < 4; ++u) t[c] |= (u == (c >> 2) ? 1u : u == (c & 3) ? 0u : 64u) << (8 * u);
  return t;
}
alignas(64) constexpr std::array<uint32_t, 16> kUnpackControl = make_unpack_control();
constexpr int64_t kUnpackAhead = 512;  // bytes of values prefetched ahead (meta: a quarter)

// One weight row's 16 groups from vp / mp (ng < 16: the first ng, the rest zero) as 16 dwords.
template <bool kFull>
inline __m512 unpack_row16(const int8_t* vp, const uint8_t* mp, int64_t ng, __m512i control, __m512i pair_base,
                           __m512i nibble_select) {
  __m512i v;
  uint64_t m = 0;
  if constexpr (kFull) {
    // 16 rows x 2 streams are more than the hardware prefetchers follow.
    _mm_prefetch(reinterpret_cast<const char*>(vp) + kUnpackAhead, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mp) + kUnpackAhead / 4, _MM_HINT_T0);
    v = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp)));
    std::memcpy(&m, mp, 8);
  } else {
    v = _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(__mmask32((uint64_t(1) << (2 * ng)) - 1), vp));
    std::memcpy(&m, mp, size_t((ng + 1) / 2));
  }
  const __m512i nib = _mm512_multishift_epi64_epi8(nibble_select, _mm512_set1_epi64(int64_t(m)));
  const __m512i ctrl = _mm512_add_epi8(_mm512_permutexvar_epi32(nib, control), pair_base);
  return _mm512_castsi512_ps(_mm512_permutex2var_epi8(v, ctrl, _mm512_setzero_si512()));
}

void unpack_int8_panel(const int8_t* values, const uint8_t* meta, int64_t K, int64_t n0, int64_t cols, int8_t* panel,
                       int32_t* wsum) {
  constexpr int64_t kTile = 16;  // the int8 family's kNB
  const int64_t half = K / 2, mbytes = (K + 7) / 8, groups = K / 4;
  const __m512i control = _mm512_load_si512(kUnpackControl.data());
  const __m512i pair_base = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(0x02020202));  // 2 l in each byte of dword l
  // vpmultishiftqb: byte 0 of dword l <- bits [4 l, 4 l + 8) of the 8 meta bytes; vpermd reads its low 4 bits.
  const __m512i nibble_select = _mm512_setr_epi64(0x0400000000LL, 0x0C00000008LL, 0x1400000010LL, 0x1C00000018LL,
                                                  0x2400000020LL, 0x2C00000028LL, 0x3400000030LL, 0x3C00000038LL);
  for (int64_t t0 = 0; t0 < cols; t0 += kTile) {
    int8_t* tile = panel + t0 * K;
    const int64_t tile_rows = std::min(kTile, cols - t0);
    const int8_t* vrow = values + (n0 + t0) * half;
    const uint8_t* mrow = meta + (n0 + t0) * mbytes;
    for (int64_t g0 = 0; g0 < groups; g0 += 16) {
      const int64_t ng = std::min<int64_t>(16, groups - g0);
      __m512 r[16];
      if (tile_rows == kTile && ng == 16) {
        _Pragma("GCC unroll 16") for (int j = 0; j < 16; ++j)
          r[j] = unpack_row16<true>(vrow + j * half + 2 * g0, mrow + j * mbytes + g0 / 2, 16, control, pair_base,
                                    nibble_select);
      } else {
        for (int j = 0; j < 16; ++j)
          r[j] = j < tile_rows ? unpack_row16<false>(vrow + j * half + 2 * g0, mrow + j * mbytes + g0 / 2, ng, control,
                                                     pair_base, nibble_select)
                               : _mm512_setzero_ps();
      }
      transpose16(r);
      if (ng == 16) {  // a constant count keeps r in registers (a variable one becomes a memcpy from the stack)
        _Pragma("GCC unroll 16") for (int g = 0; g < 16; ++g) _mm512_storeu_ps(tile + (g0 + g) * 64, r[g]);
      } else {
        for (int64_t g = 0; g < ng; ++g) _mm512_storeu_ps(tile + (g0 + g) * 64, r[g]);
      }
    }
  }
  for (int64_t j = 0; j < cols; ++j) wsum[j] = row_sum_i8(values + (n0 + j) * half, half);
}

// M = 1 (GEMV), int8: the S rows rows[0..S) in one pass over K, each its own pair of streams (values,
// meta). The row sums of the values (for the +128 correction) are accumulated in the same pass.
template <int S>
void gemv_i8_rows(const Int8Params& p, const uint8_t* x, const int64_t* rows, bool prefetch) {
  constexpr int64_t kAheadValues = 1024, kAheadMeta = 256;
  const int64_t half = p.K / 2, mbytes = (p.K + 7) / 8;
  const int64_t nfull = half / 64;
  const __m512i ones = _mm512_set1_epi8(1);
  const uint8_t* mrow[S];
  const int8_t* vrow[S];
  __m512i acc[S], ws[S];
  for (int i = 0; i < S; ++i) {
    mrow[i] = p.meta + rows[i] * mbytes;
    vrow[i] = p.values + rows[i] * half;
    acc[i] = ws[i] = _mm512_setzero_si512();
  }
  for (int64_t c = 0; c < nfull; ++c) {
    const uint8_t* xc = x + 128 * c;
    const __m512i xa = _mm512_loadu_si512(xc), xb = _mm512_loadu_si512(xc + 64);
    _Pragma("GCC unroll 4") for (int i = 0; i < S; ++i) {
      if (prefetch) {
        _mm_prefetch(reinterpret_cast<const char*>(vrow[i] + 64 * c + kAheadValues), _MM_HINT_T0);
        if ((c & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(mrow[i] + 16 * c + kAheadMeta), _MM_HINT_T0);
      }
      const __m512i idx = decode64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mrow[i] + 16 * c)));
      const __m512i w = _mm512_loadu_si512(vrow[i] + 64 * c);
      acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_permutex2var_epi8(xa, idx, xb), w);
      ws[i] = _mm512_dpbusd_epi32(ws[i], ones, w);
    }
  }
  if (64 * nfull < half) {  // the partial last chunk
    const int64_t c = nfull, tail_vals = half - 64 * c, tail_bytes = mbytes - 16 * c;
    const uint8_t* xc = x + 128 * c;
    const __m512i xa = _mm512_loadu_si512(xc), xb = _mm512_loadu_si512(xc + 64);
    for (int i = 0; i < S; ++i) {
      alignas(16) uint8_t mt[16] = {};
      std::memcpy(mt, mrow[i] + 16 * c, size_t(tail_bytes));
      const __m512i idx = decode64(_mm_load_si128(reinterpret_cast<const __m128i*>(mt)));
      const __m512i w = _mm512_maskz_loadu_epi8((__mmask64(1) << tail_vals) - 1, vrow[i] + 64 * c);
      acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_permutex2var_epi8(xa, idx, xb), w);
      ws[i] = _mm512_dpbusd_epi32(ws[i], ones, w);
    }
  }
  for (int i = 0; i < S; ++i) {
    const int64_t n = rows[i];
    const int32_t dot = _mm512_reduce_add_epi32(acc[i]) - 128 * _mm512_reduce_add_epi32(ws[i]);
    p.out[n] = int8_epilogue(dot, p.x_scales[0], p.w_scales[n], p.bias, n);
  }
}

// M = 1 (GEMV). Two rows at a time from the two halves of the task's range, so each core keeps four
// sequential streams in flight (values and meta of rows half a task apart; adjacent rows share DRAM pages
// and stream worse). Intel also gets software prefetch 1 KB ahead in the values and 256 B in the meta; AMD's
// hardware prefetcher does better alone.
void gemv_rows_i8(const Int8Params& p, int64_t n0, int64_t n1) {
  static const bool prefetch = __builtin_cpu_is("intel");
  const uint8_t* x = reinterpret_cast<const uint8_t*>(p.xq);  // u8 = s8 + 128
  const int64_t h = (n1 - n0) / 2;
  for (int64_t i = 0; i < h; ++i) {
    const int64_t rows[2] = {n0 + i, n0 + h + i};
    gemv_i8_rows<2>(p, x, rows, prefetch);
  }
  for (int64_t n = n0 + 2 * h; n < n1; ++n) gemv_i8_rows<1>(p, x, &n, prefetch);
}

}  // namespace

void float_linear(const FloatParams& p, int64_t n0, int64_t n1) {
  switch (p.values_dtype) {
    case DType::bf16: return float_linear_t<bf16_t>(p, n0, n1);
    case DType::f16: return float_linear_t<f16_t>(p, n0, n1);
    default: return float_linear_t<float>(p, n0, n1);
  }
}

void int8_linear(const Int8Params& p, int64_t n0, int64_t n1) {
  if (p.M == 1) return gemv_rows_i8(p, n0, n1);
  const int64_t half = p.K / 2;
  const int64_t mblk = std::max<int64_t>(kMB, ((256 << 10) / std::max<int64_t>(p.ldx, 1)) / kMB * kMB);
  for (int64_t mb0 = 0; mb0 < p.M; mb0 += mblk) {
    const int64_t mb1 = std::min(p.M, mb0 + mblk);
    for (int64_t n = n0; n < n1; n += kNB) {
      const int nb = int(std::min<int64_t>(kNB, n1 - n));
      int32_t wsum[kNB];
      for (int i = 0; i < nb; ++i) wsum[i] = row_sum_i8(p.values + (n + i) * half, half);
      for (int64_t m = mb0; m < mb1; m += kMB) {
        const int mb = int(std::min<int64_t>(kMB, mb1 - m));
        switch (nb) {
          case 4: micro_i8_m<4>(p, n, m, mb, wsum); break;
          case 3: micro_i8_m<3>(p, n, m, mb, wsum); break;
          case 2: micro_i8_m<2>(p, n, m, mb, wsum); break;
          default: micro_i8_m<1>(p, n, m, mb, wsum); break;
        }
      }
    }
  }
}

// The scalar version of this transpose (strided stores) took ~11% of a large-M call.
void transpose_to_xt(const float* x, int64_t ldx, int64_t rows, int64_t k0, int64_t k1, float* dst) {
  for (int64_t r0 = 0; r0 < kXtRows; r0 += 16) {
    for (int64_t k = k0; k < k1; k += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = r0 + j < rows ? _mm512_loadu_ps(x + (r0 + j) * ldx + k) : _mm512_setzero_ps();
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + (k + j) * kXtRows + r0, r[j]);
    }
  }
}

extern const Sparse24Kernels kernels{float_linear, int8_linear, true, unpack_int8_panel, transpose_to_xt};

}  // namespace fastdistill::cpu::sparse24::avx512
#endif

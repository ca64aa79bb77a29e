// int8 CPU kernels, avx512 level. Dynamic W8A8 uses VNNI (vpdpbusd, u8 x s8 with activations shifted by +128
// and the packed per-column compensation 128 * sum_k w subtracted: exact int32). Weight-only widens int8 to fp32
// (on the fly for few rows, per weight slice for many) and uses FMAs.
#include "cpu/simd/prelude.h"
#include "cpu/int8_kernels.h"

#if defined(__x86_64__)
FASTDISTILL_TARGET_AVX512
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive in _mm512_undefined_*

namespace fastdistill::cpu::int8::avx512 {

#include "cpu/int8_per_isa.inc"

namespace {

constexpr int kMR = 6;    // rows per micro-tile
constexpr int kNBLK = 4;  // 16-column blocks per micro-tile (64 columns)
constexpr int64_t kMC = kTileRows;  // rows whose sums stay in a stack tile while K is swept in slices

inline __m512 load16(DType dt, const void* base, int64_t i, __mmask16 mask) {
  switch (dt) {
    case DType::f32: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + i);
    case DType::bf16: {
      __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    default: {
      __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i);
      return _mm512_cvtph_ps(h);
    }
  }
}

void quantize_row(DType dt, const void* x, int64_t k, int64_t k_pad, int8_t* q, float* scale, uint8_t xm,
                  const float* fixed) {
  float s;
  if (fixed != nullptr) {
    s = *fixed;
  } else {
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
      const __mmask16 mask = k - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - j)) - 1);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(dt, x, j, mask)));
    }
    s = _mm512_reduce_max_ps(vmax) / 127.f;
    *scale = s;
  }
  if (s == 0.f) {
    std::memset(q, int(xm), size_t(k_pad));
    return;
  }
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m128i vx = _mm_set1_epi8(char(xm));
  for (int64_t j = 0; j < k; j += 16) {
    const __mmask16 mask = k - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - j)) - 1);
    __m512 r = _mm512_div_ps(load16(dt, x, j, mask), vs);
    r = _mm512_roundscale_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(hi, _mm512_max_ps(lo, r));
    __m128i b = _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)), vx);
    _mm_mask_storeu_epi8(q + j, mask, b);
  }
  for (int64_t j = k; j < k_pad; ++j) q[j] = int8_t(xm);
}

// MR rows x NBLK 16-column blocks over `groups` groups of 4 k; c is [MR][64] int32, accumulated
// into when `accumulate` (K blocking), else overwritten.
template <int MR, int NBLK>
void ukernel_vnni(const int8_t* a, int64_t lda, const int8_t* b, int64_t bstride, int64_t groups, int32_t* c,
                  bool accumulate) {
  __m512i acc[MR][NBLK];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NBLK; ++j)
      acc[i][j] = accumulate ? _mm512_loadu_si512(c + i * 64 + j * 16) : _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i bv[NBLK];
    _Pragma("GCC unroll 8") for (int j = 0; j < NBLK; ++j) {
      bv[j] = _mm512_loadu_si512(b + j * bstride + g * 64);
      _mm_prefetch(reinterpret_cast<const char*>(b + j * bstride + g * 64 + 1024), _MM_HINT_T0);
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, a + i * lda + g * 4, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      _Pragma("GCC unroll 8") for (int j = 0; j < NBLK; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NBLK; ++j) _mm512_storeu_si512(c + i * 64 + j * 16, acc[i][j]);
}

using UKernel = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, bool);

template <int MR>
constexpr UKernel pick(int nblk) {
  return nblk == 1 ? ukernel_vnni<MR, 1> : nblk == 2 ? ukernel_vnni<MR, 2> : nblk == 3 ? ukernel_vnni<MR, 3>
                                                                                     : ukernel_vnni<MR, 4>;
}

UKernel kernel_for(int mr, int nblk) {
  return with_rows(mr, [nblk](auto rows) { return pick<decltype(rows)::value>(nblk); });
}

// Weight-only: MR rows x one 16-column block. Each 16-byte quarter of a 64-byte tile row holds 4
// columns x 4 k; it is widened to 16 fp32 lanes and multiplied by x[k..k+3] repeated 4 times.
template <int MR>
void ukernel_wo(const float* x, int64_t ldx, const int8_t* blk, int64_t groups, float* c) {
  __m512 acc[MR][4];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 w[4];
    _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q)
      w[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + g * 64 + q * 16))));
    _mm_prefetch(reinterpret_cast<const char*>(blk + g * 64 + 1024), _MM_HINT_T0);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_broadcast_f32x4(_mm_loadu_ps(x + i * ldx + g * 4));
      _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_fmadd_ps(w[q], xv, acc[i][q]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    alignas(64) float t[4][16];
    _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q) _mm512_store_ps(t[q], acc[i][q]);
    _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q)
      for (int cc = 0; cc < 4; ++cc)
        c[i * 16 + q * 4 + cc] = (t[q][cc * 4 + 0] + t[q][cc * 4 + 1]) + (t[q][cc * 4 + 2] + t[q][cc * 4 + 3]);
  }
}

// Weight-only, larger M: dequantise a 64-column x kKCW-k slice of the packed weights into fp32
// [k][64] once, then run an fp32 register-blocked micro-kernel (MR rows x 64 columns) over it.
constexpr int64_t kKCW = kWoSliceK;

void dequant_slice(const int8_t* bp, int64_t bstride, int nblk, int64_t g0, int64_t g, float* buf) {
  // Lane (c, u) of a 16-byte quarter = column c, k offset u; reorder to (u, c).
  const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int j = 0; j < 4; ++j) {
    if (j >= nblk) {
      for (int64_t kk = 0; kk < g * kKG; ++kk) _mm512_storeu_ps(buf + kk * 64 + j * 16, _mm512_setzero_ps());
      continue;
    }
    const int8_t* src = bp + j * bstride + g0 * 64;
    for (int64_t gg = 0; gg < g; ++gg) {
      _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q) {
        const __m512 v = _mm512_permutexvar_ps(perm, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + gg * 64 + q * 16)))));
        float* dst = buf + gg * kKG * 64 + j * 16 + q * 4;
        _mm_storeu_ps(dst, _mm512_castps512_ps128(v));
        _mm_storeu_ps(dst + 64, _mm512_extractf32x4_ps(v, 1));
        _mm_storeu_ps(dst + 128, _mm512_extractf32x4_ps(v, 2));
        _mm_storeu_ps(dst + 192, _mm512_extractf32x4_ps(v, 3));
      }
    }
  }
}

template <int MR>
void ukernel_f32(const float* x, int64_t ldx, const float* buf, int64_t kc, float* c, bool accumulate) {
  __m512 acc[MR][4];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)
      acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * 64 + j * 16) : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kc; ++kk) {
    __m512 bv[4];
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) bv[j] = _mm512_loadu_ps(buf + kk * 64 + j * 16);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(x[i * ldx + kk]);
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + i * 64 + j * 16, acc[i][j]);
}

using FKernel = void (*)(const float*, int64_t, const float*, int64_t, float*, bool);
FKernel fkernel_for(int mr) {
  return with_rows(mr, [](auto rows) -> FKernel { return ukernel_f32<decltype(rows)::value>; });
}

void gemm_wo_panels(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  alignas(64) float c[kMC * 64];
  alignas(64) float buf[kKCW * 64];
  const int64_t groups = p.k_pad / kKG, bstride = p.k_pad * kNB, kcg = kKCW / kKG;
  for (int64_t b = nb0; b < nb1; b += kNBLK) {
    const int nblk = int(std::min<int64_t>(kNBLK, nb1 - b));
    const int8_t* bp = p.w + b * bstride;
    const int64_t n0 = b * kNB, cols = std::min<int64_t>(nblk * kNB, p.n - n0);
    for (int64_t mc = m0; mc < m1; mc += kMC) {
      const int64_t mc1 = std::min(m1, mc + kMC);
      if (groups == 0) std::memset(c, 0, sizeof(c));
      for (int64_t g0 = 0; g0 < groups; g0 += kcg) {
        const int64_t g = std::min(kcg, groups - g0);
        dequant_slice(bp, bstride, nblk, g0, g, buf);
        for (int64_t m = mc; m < mc1; m += kMR) {
          const int mr = int(std::min<int64_t>(kMR, mc1 - m));
          fkernel_for(mr)(p.x + m * p.ldx + g0 * kKG, p.ldx, buf, g * kKG, c + (m - mc) * 64, g0 > 0);
        }
      }
      epilogue_wo(p, c, 64, mc, mc1 - mc, n0, cols);
    }
  }
}

}  // namespace

void quantize_rows(const QuantParams& p, int64_t r0, int64_t r1) {
  const size_t es = p.dtype == DType::f32 ? 4 : 2;
  for (int64_t r = r0; r < r1; ++r)
    quantize_row(p.dtype, static_cast<const char*>(p.x) + r * p.ldx * es, p.k, p.k_pad, p.q + r * p.ldq,
                 p.fixed_scale != nullptr ? nullptr : p.scales + r, p.xor_mask, p.fixed_scale);
}

// Blocking: the panel's rows in micro-tiles of kMR, and K in slices of kKC so that the weight slice (64 x kKC bytes)
// and the activation slice (kTileRows x kKC) stay in L2 while the micro-kernels sweep them.
constexpr int64_t kKC = 2048;

void gemm_s8_panel(const int8_t* a, int64_t lda, const int8_t* panel, int64_t k_pad, int nblk, int64_t rows,
                   int32_t* c) {
  const int64_t groups = k_pad / kKG, bstride = k_pad * kNB, kcg = kKC / kKG;
  if (groups == 0) std::memset(c, 0, size_t(rows * kPanelCols) * sizeof(int32_t));
  for (int64_t g0 = 0; g0 < groups; g0 += kcg) {
    const int64_t g = std::min(kcg, groups - g0);
    for (int64_t m = 0; m < rows; m += kMR) {
      const int mr = int(std::min<int64_t>(kMR, rows - m));
      kernel_for(mr, nblk)(a + m * lda + g0 * kKG, lda, panel + g0 * kNB * kKG, bstride, g, c + m * kPanelCols,
                           g0 > 0);
    }
  }
}

void gemm_s8(const GemmParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  gemm_s8_by_panels(p, m0, m1, nb0, nb1, gemm_s8_panel);
}

// Weight-only: many rows -> fp32 slices (the dequantisation is amortised over up to 96 rows); few rows -> convert
// on the fly (each weight converted once per 6 rows).
void gemm_wo(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  if (m1 - m0 >= 32) return gemm_wo_panels(p, m0, m1, nb0, nb1);
  alignas(64) float c[6 * 16];
  const int64_t groups = p.k_pad / kKG;
  for (int64_t b = nb0; b < nb1; ++b) {
    const int8_t* blk = p.w + b * p.k_pad * kNB;
    const int64_t n0 = b * kNB, cols = std::min<int64_t>(kNB, p.n - n0);
    for (int64_t m = m0; m < m1; m += 6) {
      const int mr = int(std::min<int64_t>(6, m1 - m));
      const float* x = p.x + m * p.ldx;
      with_rows(mr, [&](auto rows) { ukernel_wo<decltype(rows)::value>(x, p.ldx, blk, groups, c); });
      epilogue_wo(p, c, 16, m, mr, n0, cols);
    }
  }
}

extern const Int8Kernels kernels{quantize_rows, gemm_s8, gemm_s8_panel, true, gemm_wo, nullptr};

}  // namespace fastdistill::cpu::int8::avx512

#endif  // __x86_64__

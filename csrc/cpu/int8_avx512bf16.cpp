// int8 CPU kernels, avx512bf16 level: the avx512 level's kernels, plus weight-only with bf16 activations through
// native bf16 dot products. int8 -> bf16 is exact and bf16 x bf16 products are exact in fp32, so vdpbf16ps (2
// products per lane per instruction) loses nothing against fp32 FMAs on the same bf16 inputs.
#include "cpu/simd/prelude.h"
#include "cpu/int8_kernels.h"

#if defined(__x86_64__)
FASTDISTILL_TARGET_AVX512BF16
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive in _mm512_undefined_*

namespace fastdistill::cpu::int8::avx512bf16 {

#include "cpu/int8_per_isa.inc"

namespace {

constexpr int kMR = 6;    // rows per micro-tile
constexpr int kNBLK = 4;  // 16-column blocks per micro-tile (64 columns)

// Slice layout: [k / 2][64 columns] dwords, each two bf16 weights (k even, k odd).
void dequant_slice_bf16(const int8_t* bp, int64_t bstride, int nblk, int64_t g0, int64_t g, uint32_t* buf) {
  const __m256i deint = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int j = 0; j < 4; ++j) {
    if (j >= nblk) {
      for (int64_t kp = 0; kp < g * 2; ++kp) _mm512_storeu_si512(buf + kp * 64 + j * 16, _mm512_setzero_si512());
      continue;
    }
    const int8_t* src = bp + j * bstride + g0 * 64;
    for (int64_t gg = 0; gg < g; ++gg) {
      _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q) {
        // 4 columns x 4 k -> 16 bf16 in (column, k) order = dwords (c, pair); split the pairs.
        const __m512 v = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + gg * 64 + q * 16))));
        const __m256i h = _mm256_permutevar8x32_epi32((__m256i)_mm512_cvtneps_pbh(v), deint);
        uint32_t* dst = buf + gg * 2 * 64 + j * 16 + q * 4;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 64), _mm256_extracti128_si256(h, 1));
      }
    }
  }
}

template <int MR>
void ukernel_bf16(const bf16_t* x, int64_t ldx, const uint32_t* buf, int64_t kpairs, float* c, bool accumulate) {
  __m512 acc[MR][4];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)
      acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * 64 + j * 16) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    __m512bh bv[4];
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(buf + kp * 64 + j * 16);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      int32_t x2;
      std::memcpy(&x2, x + i * ldx + 2 * kp, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(x2);
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + i * 64 + j * 16, acc[i][j]);
}

using BKernel = void (*)(const bf16_t*, int64_t, const uint32_t*, int64_t, float*, bool);
BKernel bkernel_for(int mr) {
  return with_rows(mr, [](auto rows) -> BKernel { return ukernel_bf16<decltype(rows)::value>; });
}

}  // namespace

void gemm_wo_bf16(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  alignas(64) float c[kTileRows * 64];
  alignas(64) uint32_t buf[kWoSliceK / 2 * 64];
  const int64_t groups = p.k_pad / kKG, bstride = p.k_pad * kNB, kcg = kWoSliceK / kKG;
  for (int64_t b = nb0; b < nb1; b += kNBLK) {
    const int nblk = int(std::min<int64_t>(kNBLK, nb1 - b));
    const int8_t* bp = p.w + b * bstride;
    const int64_t n0 = b * kNB, cols = std::min<int64_t>(nblk * kNB, p.n - n0);
    for (int64_t mc = m0; mc < m1; mc += kTileRows) {
      const int64_t mc1 = std::min(m1, mc + kTileRows);
      if (groups == 0) std::memset(c, 0, sizeof(c));
      for (int64_t g0 = 0; g0 < groups; g0 += kcg) {
        const int64_t g = std::min(kcg, groups - g0);
        dequant_slice_bf16(bp, bstride, nblk, g0, g, buf);
        for (int64_t m = mc; m < mc1; m += kMR) {
          const int mr = int(std::min<int64_t>(kMR, mc1 - m));
          bkernel_for(mr)(p.xb + m * p.ldx + g0 * kKG, p.ldx, buf, g * 2, c + (m - mc) * 64, g0 > 0);
        }
      }
      epilogue_wo(p, c, 64, mc, mc1 - mc, n0, cols);
    }
  }
}


extern const Int8Kernels kernels{avx512::quantize_rows, avx512::gemm_s8, avx512::gemm_s8_panel, true,
                                 avx512::gemm_wo, gemm_wo_bf16};

}  // namespace fastdistill::cpu::int8::avx512bf16

#endif  // __x86_64__

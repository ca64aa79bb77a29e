// int8 CPU kernels, avx2 level. vpmaddubsw would saturate (u8 x s8 pair sums reach 64770), so the
// dynamic GEMM sign-extends both operands to int16 and uses vpmaddwd (pair sums <= 2 * 127 * 127:
// exact), accumulating in int32. Weight-only widens int8 -> fp32 and uses fma.
#include "cpu/simd/prelude.h"
#include "cpu/int8_kernels.h"

#if defined(__x86_64__)
FASTDISTILL_TARGET_AVX2

namespace fastdistill::cpu::int8::avx2 {

#include "cpu/int8_per_isa.inc"

namespace {

constexpr int kMR = 3;

// MR rows x one 16-column block, sums to c[i * kPanelCols + j]. Quarter q (16 bytes = 4 columns x 4 k) is widened to 16 int16;
// vpmaddwd with x[k..k+3] (int16, repeated 4 times) gives, per column, two int32 partial sums.
template <int MR>
void ukernel_s8(const int8_t* a, int64_t lda, const int8_t* blk, int64_t groups, int32_t* c) {
  __m256i acc[MR][4];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i av[MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, a + i * lda + g * 4, 4);
      av[i] = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(a4)));
    }
    _mm_prefetch(reinterpret_cast<const char*>(blk + g * 64 + 1024), _MM_HINT_T0);
    _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + g * 64 + q * 16)));
      _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) acc[i][q] = _mm256_add_epi32(acc[i][q], _mm256_madd_epi16(w, av[i]));
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    alignas(32) int32_t t[4][8];
    _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(t[q]), acc[i][q]);
    _Pragma("GCC unroll 8") for (int q = 0; q < 4; ++q)
      for (int cc = 0; cc < 4; ++cc) c[i * kPanelCols + q * 4 + cc] = t[q][2 * cc] + t[q][2 * cc + 1];
  }
}

// Weight-only, one row x one 16-column block: 8-byte chunk h = 2 columns x 4 k -> 8 fp32 lanes.
void ukernel_wo(const float* x, const int8_t* blk, int64_t groups, float* c) {
  __m256 acc[8];
  _Pragma("GCC unroll 8") for (int h = 0; h < 8; ++h) acc[h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 xv = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + g * 4));
    _mm_prefetch(reinterpret_cast<const char*>(blk + g * 64 + 1024), _MM_HINT_T0);
    _Pragma("GCC unroll 8") for (int h = 0; h < 8; ++h) {
      const __m256 w = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + g * 64 + h * 8))));
      acc[h] = _mm256_fmadd_ps(w, xv, acc[h]);
    }
  }
  alignas(32) float t[8];
  _Pragma("GCC unroll 8") for (int h = 0; h < 8; ++h) {
    _mm256_store_ps(t, acc[h]);
    c[2 * h] = (t[0] + t[1]) + (t[2] + t[3]);
    c[2 * h + 1] = (t[4] + t[5]) + (t[6] + t[7]);
  }
}

}  // namespace

void quantize_rows(const QuantParams& p, int64_t r0, int64_t r1) { quantize_rows_generic(p, r0, r1); }

void gemm_s8_panel(const int8_t* a, int64_t lda, const int8_t* panel, int64_t k_pad, int nblk, int64_t rows,
                   int32_t* c) {
  const int64_t groups = k_pad / kKG;
  for (int t = 0; t < nblk; ++t) {
    const int8_t* blk = panel + t * k_pad * kNB;
    for (int64_t m = 0; m < rows; m += kMR) {
      const int mr = int(std::min<int64_t>(kMR, rows - m));
      int32_t* ct = c + m * kPanelCols + t * kNB;
      switch (mr) {
        case 1: ukernel_s8<1>(a + m * lda, lda, blk, groups, ct); break;
        case 2: ukernel_s8<2>(a + m * lda, lda, blk, groups, ct); break;
        default: ukernel_s8<3>(a + m * lda, lda, blk, groups, ct); break;
      }
    }
  }
}

void gemm_s8(const GemmParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  gemm_s8_by_panels(p, m0, m1, nb0, nb1, gemm_s8_panel);
}

void gemm_wo(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  alignas(64) float c[16];
  const int64_t groups = p.k_pad / kKG;
  for (int64_t b = nb0; b < nb1; ++b) {
    const int8_t* blk = p.w + b * p.k_pad * kNB;
    const int64_t n0 = b * kNB, cols = std::min<int64_t>(kNB, p.n - n0);
    for (int64_t m = m0; m < m1; ++m) {
      ukernel_wo(p.x + m * p.ldx, blk, groups, c);
      epilogue_wo(p, c, 16, m, 1, n0, cols);
    }
  }
}

extern const Int8Kernels kernels{quantize_rows, gemm_s8, gemm_s8_panel, false, gemm_wo, nullptr};

}  // namespace fastdistill::cpu::int8::avx2

#endif  // __x86_64__

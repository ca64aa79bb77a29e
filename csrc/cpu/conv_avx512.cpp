// int8 Conv2d CPU kernels, avx512 level: the shared implicit GEMM driver and epilogue (conv_per_isa.inc), and the
// depthwise kernel on VNNI word dot products: 16 channels per vector, x sign-extended to 32-bit lanes, w stored
// with 0 high halves (conv_kernels.h), so vpdpwssd adds exactly x * w per lane.
#include <vector>

#include "cpu/simd/prelude.h"
#include "cpu/conv_kernels.h"

#if defined(__x86_64__)
FASTDISTILL_TARGET_AVX512

namespace fastdistill::cpu::conv::avx512 {

#include "cpu/conv_per_isa.inc"

namespace {
constexpr int64_t kMaxTaps = 64;  // larger kernels take the portable form
}

void depthwise(const ConvParams& p, int64_t m0, int64_t m1) {
  const int64_t taps = p.kh * p.kw;
  if (taps > kMaxTaps) return depthwise_generic(p, m0, m1);
  alignas(64) int32_t acc[kPanelCols];
  int64_t pix[kMaxTaps];
  for (int64_t m = m0; m < m1; ++m) {
    const PixelCoords pc = coords(p, m);
    int64_t valid = 0;
    int64_t tap_of[kMaxTaps];
    for (int64_t r = 0; r < p.kh; ++r)
      for (int64_t s = 0; s < p.kw; ++s) {
        const int64_t px = tap_pixel(p, pc, r, s);
        if (px >= 0) pix[valid] = px * p.ldq, tap_of[valid++] = (r * p.kw + s) * p.ldq;
      }
    for (int64_t c0 = 0; c0 < p.c; c0 += kPanelCols) {
      const int64_t cols = std::min<int64_t>(kPanelCols, p.c - c0);
      const int64_t nv = std::min<int64_t>(4, (p.ldq - c0) / 16);  // ldq = c_pad: whole vectors, zero padded
      __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
      for (int64_t t = 0; t < valid; ++t) {
        const int8_t* x = p.q + pix[t] + c0;
        const int32_t* w = p.dw_w + tap_of[t] + c0;
        _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v) {
          if (v < nv) {
            const __m512i xv = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16 * v)));
            a[v] = _mm512_dpwssd_epi32(a[v], xv, _mm512_loadu_si512(w + 16 * v));
          }
        }
      }
      _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v) _mm512_store_si512(acc + 16 * v, a[v]);
      epilogue(p, acc, kPanelCols, kZeroComp, m, 1, c0, cols);
    }
  }
}

extern const ConvKernels kernels{gemm_rows, depthwise};

}  // namespace fastdistill::cpu::conv::avx512

#endif  // __x86_64__

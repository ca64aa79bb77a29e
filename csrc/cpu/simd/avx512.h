// 16 x fp32 vector helpers for AVX-512 (F, BW, VL, DQ). Include after `#pragma GCC target`. The same interface
// serves the avx512bf16 level: a file compiled for it defines FASTDISTILL_SIMD_AVX512BF16 first, which puts the
// interface in namespace avx512bf16 and makes the fp32 -> bf16 conversions the native instructions (GCC's
// target pragma does not define __AVX512BF16__, so the level says it).
#pragma once
#if defined(FASTDISTILL_SIMD_AVX512BF16)
#define FASTDISTILL_SIMD_AVX512_NS avx512bf16
#else
#define FASTDISTILL_SIMD_AVX512_NS avx512
#endif

namespace fastdistill::cpu::FASTDISTILL_SIMD_AVX512_NS {

struct VecF { __m512 v; };
using Mask = __mmask16;
constexpr int kLanes = 16;

inline VecF vset1(float x) { return {_mm512_set1_ps(x)}; }
inline VecF operator+(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VecF vfma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF vmax(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm512_abs_ps(a.v)}; }
inline Mask vgt(VecF a, VecF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
inline int vfirst_eq(VecF a, float x) {  // the first lane equal to x, or -1
  const unsigned m = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(x), _CMP_EQ_OQ);
  return m ? __builtin_ctz(m) : -1;
}
inline Mask veq_int(__m512i a, __m512i b) { return _mm512_cmpeq_epi32_mask(a, b); }
inline VecF vselect(Mask m, VecF a, VecF b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
inline VecF vfma_if(Mask m, VecF a, VecF b, VecF c) { return {_mm512_mask3_fmadd_ps(a.v, b.v, c.v, m)}; }  // m ? a*b+c : c
inline float vsum(VecF a) { return _mm512_reduce_add_ps(a.v); }
inline float vmaxall(VecF a) { return _mm512_reduce_max_ps(a.v); }

inline VecF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline VecF vload(const bf16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
inline VecF vload(const f16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }

// Loads n < 16 elements; the other lanes hold `fill`.
inline VecF vload_tail(const float* p, int n, float fill) {
  return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), Mask((1u << n) - 1), p)};
}
template <class T>
inline VecF vload_tail(const T* p, int n, float fill) {
  const Mask m = Mask((1u << n) - 1);
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  VecF x = std::is_same<T, bf16_t>::value
               ? VecF{_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))}
               : VecF{_mm512_cvtph_ps(h)};
  return {_mm512_mask_blend_ps(m, _mm512_set1_ps(fill), x.v)};
}

// bf16 rounded to nearest even in the high half of each 32-bit lane (the low half is junk); NaN stays a
// quiet NaN.
inline __m512i bf16_high_bits(VecF x) {
  const __m512i u = _mm512_castps_si512(x.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}
#if defined(FASTDISTILL_SIMD_AVX512BF16)
inline __m256i to_bf16_bits(VecF x) { return __m256i(_mm512_cvtneps_pbh(x.v)); }
#else
inline __m256i to_bf16_bits(VecF x) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high_bits(x), 16)); }
#endif
inline __m256i to_f16_bits(VecF x) { return _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline void vstore(float* p, VecF x) { _mm512_storeu_ps(p, x.v); }
inline void vstore(bf16_t* p, VecF x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(x)); }
inline void vstore(f16_t* p, VecF x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_f16_bits(x)); }
// Non-temporal stores (p 64-byte aligned for fp32, 32-byte for 16-bit types): for outputs far larger
// than the cache, they skip the read-for-ownership of each line, a third less DRAM traffic for the
// loss gradient. Follow with vstream_fence() before the data is read by another thread.
inline void vstream(float* p, VecF x) { _mm512_stream_ps(p, x.v); }
inline void vstream(bf16_t* p, VecF x) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(x)); }
inline void vstream(f16_t* p, VecF x) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_f16_bits(x)); }
inline void vstream_fence() { _mm_sfence(); }
inline void vstore_tail(float* p, VecF x, int n) { _mm512_mask_storeu_ps(p, Mask((1u << n) - 1), x.v); }
inline void vstore_tail(bf16_t* p, VecF x, int n) { _mm256_mask_storeu_epi16(p, Mask((1u << n) - 1), to_bf16_bits(x)); }
inline void vstore_tail(f16_t* p, VecF x, int n) { _mm256_mask_storeu_epi16(p, Mask((1u << n) - 1), to_f16_bits(x)); }

// Two vectors' worth at once, for element-wise code that does not care which column sits in which lane
// (pair_lane says). bf16 splits into the even columns (one shift) and the odd ones (one mask) instead of
// a widening shuffle plus a shift per 16, and goes back with one ternary-logic merge instead of two
// narrowing shuffles. Other types use the generic natural order (kd_loss_per_isa.inc).
inline void vload2(const bf16_t* p, VecF& even, VecF& odd) {
  const __m512i w = _mm512_loadu_si512(p);
  even = {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  odd = {_mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))))};
}
inline __m512i bf16_pair_bits(VecF even, VecF odd) {  // odd's high halves | even's high halves >> 16
#if defined(FASTDISTILL_SIMD_AVX512BF16)
  // One conversion of both (even's in words 0-15, odd's in 16-31), then one word shuffle interleaves them.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, __m512i(_mm512_cvtne2ps_pbh(odd.v, even.v)));
#else
  return _mm512_ternarylogic_epi32(_mm512_srli_epi32(bf16_high_bits(even), 16), bf16_high_bits(odd),
                                   _mm512_set1_epi32(int(0xffff0000u)), 0xF8);
#endif
}
inline void vstore2(bf16_t* p, VecF even, VecF odd) { _mm512_storeu_si512(p, bf16_pair_bits(even, odd)); }
inline void vstream2(bf16_t* p, VecF even, VecF odd) {  // p 32-byte aligned, as for vstream
  const __m512i b = bf16_pair_bits(even, odd);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(b));
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p) + 1, _mm512_extracti64x4_epi64(b, 1));
}
constexpr int pair_lane(const bf16_t*, int j) { return (j & 1) * kLanes + (j >> 1); }

// 2^x as p(f) * 2^floor(x), f = x - floor(x) in [0, 1]: vreduceps gives f in one µop and vscalefps takes
// floor(x) from x itself, so there is no separate rounding step. p(f) = 1 + f (c[N-1] + f (... + f c[0])), a
// relative-minimax fit of 2^f on [0, 1] with p(0) = 1. -inf gives f = 0 and a zero scale, so exactly 0; large
// negative x underflows to 0 (denormals unless flushed), large positive x overflows to +inf, NaN propagates.
template <int N>
inline VecF exp2_poly(VecF x, const float (&c)[N]) {
  const __m512 f = _mm512_reduce_ps(x.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return {_mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f)), x.v)};
}

// Degree 6: relative error 2e-9, 1.05 ulp after fp32 Horner (8 µops).
inline VecF vexp2(VecF x) {
  static constexpr float c[] = {2.161291631637141e-04f, 1.2467845808714628e-03f, 9.675451554358006e-03f,
                                5.5485282093286514e-02f, 2.402293086051941e-01f, 6.931470632553101e-01f};
  return exp2_poly(x, c);
}

// For 16-bit logits (kd_loss_per_isa.inc's exp2_for): degree 4, relative error 3e-6, 2.5 orders below fp16's
// eps and 3.4 below bf16's (6 µops).
inline VecF vexp2_16bit(VecF x) {
  static constexpr float c[] = {0.013426804915070534f, 0.052242279052734375f, 0.24128030240535736f,
                                0.6930448412895203f};
  return exp2_poly(x, c);
}

// log2(1 + u) for u in [0, 1] via 2 atanh(t) / ln 2, t = u / (2 + u) <= 1/3 (odd series to t^13).
inline VecF vlog2_1p01(VecF u) {
  __m512 t = _mm512_div_ps(u.v, _mm512_add_ps(u.v, _mm512_set1_ps(2.0f)));
  __m512 t2 = _mm512_mul_ps(t, t);
  __m512 s = _mm512_set1_ps(1.0f / 13);
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.0f / 11));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.0f / 9));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.0f / 7));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.0f / 5));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.0f / 3));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.0f));
  return {_mm512_mul_ps(_mm512_mul_ps(t, _mm512_set1_ps(2.8853900817779268f)), s)};
}

}  // namespace fastdistill::cpu::FASTDISTILL_SIMD_AVX512_NS

// 8 x fp32 vector helpers for AVX2 + FMA + F16C. Include after `#pragma GCC target`.
#pragma once

namespace fastdistill::cpu::avx2 {

struct VecF { __m256 v; };
using Mask = __m256;  // all-ones lanes are true
constexpr int kLanes = 8;

inline VecF vset1(float x) { return {_mm256_set1_ps(x)}; }
inline VecF operator+(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VecF vfma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF vmax(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline Mask vgt(VecF a, VecF b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ); }
inline int vfirst_eq(VecF a, float x) {  // the first lane equal to x, or -1
  const unsigned m = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a.v, _mm256_set1_ps(x), _CMP_EQ_OQ)));
  return m ? __builtin_ctz(m) : -1;
}
inline VecF vselect(Mask m, VecF a, VecF b) { return {_mm256_blendv_ps(b.v, a.v, m)}; }
inline VecF vfma_if(Mask m, VecF a, VecF b, VecF c) { return {_mm256_blendv_ps(c.v, _mm256_fmadd_ps(a.v, b.v, c.v), m)}; }
inline float vsum(VecF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vmaxall(VecF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline VecF vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline VecF vload(const bf16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
inline VecF vload(const f16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }

// Loads n < 8 elements; the other lanes hold `fill`.
template <class T>
inline VecF vload_tail(const T* p, int n, float fill) {
  alignas(32) float buf[kLanes];
  for (int i = 0; i < kLanes; ++i) buf[i] = i < n ? to_float(p[i]) : fill;
  return {_mm256_load_ps(buf)};
}

// bf16 rounded to nearest even in the high half of each 32-bit lane (the low half is junk); NaN stays a
// quiet NaN.
inline __m256i bf16_high_bits(VecF x) {
  const __m256i u = _mm256_castps_si256(x.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
}
inline __m128i to_bf16_bits(VecF x) {
  const __m256i r = _mm256_srli_epi32(bf16_high_bits(x), 16);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
// See avx512.h: bf16 pairs as even / odd columns.
inline void vload2(const bf16_t* p, VecF& even, VecF& odd) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  odd = {_mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xffff0000u))))};
}
inline __m256i bf16_pair_bits(VecF even, VecF odd) {  // 16-bit blend: odd words from `odd`
  return _mm256_blend_epi16(_mm256_srli_epi32(bf16_high_bits(even), 16), bf16_high_bits(odd), 0xAA);
}
inline void vstore2(bf16_t* p, VecF even, VecF odd) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_pair_bits(even, odd));
}
inline void vstream2(bf16_t* p, VecF even, VecF odd) {  // p 16-byte aligned, as for vstream
  const __m256i b = bf16_pair_bits(even, odd);
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(b));
  _mm_stream_si128(reinterpret_cast<__m128i*>(p) + 1, _mm256_extracti128_si256(b, 1));
}
constexpr int pair_lane(const bf16_t*, int j) { return (j & 1) * kLanes + (j >> 1); }
inline __m128i to_f16_bits(VecF x) { return _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline void vstore(float* p, VecF x) { _mm256_storeu_ps(p, x.v); }
inline void vstore(bf16_t* p, VecF x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits(x)); }
inline void vstore(f16_t* p, VecF x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_f16_bits(x)); }
inline void vstream(float* p, VecF x) { _mm256_stream_ps(p, x.v); }  // see avx512.h
inline void vstream(bf16_t* p, VecF x) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits(x)); }
inline void vstream(f16_t* p, VecF x) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_f16_bits(x)); }
inline void vstream_fence() { _mm_sfence(); }
template <class T>
inline void vstore_tail(T* p, VecF x, int n) {
  alignas(32) T buf[kLanes];
  vstore(buf, x);
  for (int i = 0; i < n; ++i) p[i] = buf[i];
}

// 2^x as p(f) * 2^n, n = round(x), f = x - n in [-1/2, 1/2], with x clamped to [-126, 127] and x < -126 (-inf
// included) giving 0. p(f) = 1 + f (c[N-1] + f (... + f c[0])), a relative-minimax fit of 2^f with p(0) = 1.
template <int N>
inline VecF exp2_poly(VecF x, const float (&c)[N]) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(lo, x.v));
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(c[0]);
  for (int i = 1; i < N; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c[i]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return {_mm256_andnot_ps(_mm256_cmp_ps(x.v, lo, _CMP_LT_OQ), y)};  // underflow and -inf -> 0
}

inline VecF vexp2(VecF x) {  // degree 6
  static constexpr float c[] = {1.5403530393381606e-04f, 1.3333558146428441e-03f, 9.6181291076284770e-03f,
                                5.5504108664821576e-02f, 2.4022650695910070e-01f, 6.9314718055994530e-01f};
  return exp2_poly(x, c);
}

// For 16-bit logits (kd_loss_per_isa.inc's exp2_for): degree 4, relative error 3e-6.
inline VecF vexp2_16bit(VecF x) {
  static constexpr float c[] = {0.009582855738699436f, 0.05590646713972092f, 0.24024099111557007f,
                                0.6931241750717163f};
  return exp2_poly(x, c);
}

// log2(1 + u) for u in [0, 1] via 2 atanh(u / (2 + u)) / ln 2.
inline VecF vlog2_1p01(VecF u) {
  __m256 t = _mm256_div_ps(u.v, _mm256_add_ps(u.v, _mm256_set1_ps(2.0f)));
  __m256 t2 = _mm256_mul_ps(t, t);
  __m256 s = _mm256_set1_ps(1.0f / 13);
  s = _mm256_fmadd_ps(s, t2, _mm256_set1_ps(1.0f / 11));
  s = _mm256_fmadd_ps(s, t2, _mm256_set1_ps(1.0f / 9));
  s = _mm256_fmadd_ps(s, t2, _mm256_set1_ps(1.0f / 7));
  s = _mm256_fmadd_ps(s, t2, _mm256_set1_ps(1.0f / 5));
  s = _mm256_fmadd_ps(s, t2, _mm256_set1_ps(1.0f / 3));
  s = _mm256_fmadd_ps(s, t2, _mm256_set1_ps(1.0f));
  return {_mm256_mul_ps(_mm256_mul_ps(t, _mm256_set1_ps(2.8853900817779268f)), s)};
}

}  // namespace fastdistill::cpu::avx2

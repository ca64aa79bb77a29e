// The portable path: the same vector interface in plain C++ over 4 lanes, so kernels are written
// once. Four lanes (not one) give sums four partial accumulators, as accurate as the SIMD paths.
#pragma once

namespace fastdistill::cpu::scalar {

constexpr int kLanes = 4;
struct VecF { float v[kLanes]; };
struct Mask { bool m[kLanes]; };

template <class F>
inline VecF vmap(F f) {
  VecF r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = f(i);
  return r;
}
inline VecF vset1(float x) { return vmap([&](int) { return x; }); }
inline VecF operator+(VecF a, VecF b) { return vmap([&](int i) { return a.v[i] + b.v[i]; }); }
inline VecF operator-(VecF a, VecF b) { return vmap([&](int i) { return a.v[i] - b.v[i]; }); }
inline VecF operator*(VecF a, VecF b) { return vmap([&](int i) { return a.v[i] * b.v[i]; }); }
inline VecF vfma(VecF a, VecF b, VecF c) { return vmap([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); }); }
inline VecF vmax(VecF a, VecF b) { return vmap([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
inline VecF vabs(VecF a) { return vmap([&](int i) { return std::fabs(a.v[i]); }); }
inline Mask vgt(VecF a, VecF b) {
  Mask m;
  for (int i = 0; i < kLanes; ++i) m.m[i] = a.v[i] > b.v[i];
  return m;
}
inline int vfirst_eq(VecF a, float x) {  // the first lane equal to x, or -1
  for (int i = 0; i < kLanes; ++i)
    if (a.v[i] == x) return i;
  return -1;
}
inline VecF vselect(Mask m, VecF a, VecF b) { return vmap([&](int i) { return m.m[i] ? a.v[i] : b.v[i]; }); }
inline VecF vfma_if(Mask m, VecF a, VecF b, VecF c) {
  return vmap([&](int i) { return m.m[i] ? std::fma(a.v[i], b.v[i], c.v[i]) : c.v[i]; });
}
inline float vsum(VecF a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
inline float vmaxall(VecF a) { return std::max(std::max(a.v[0], a.v[1]), std::max(a.v[2], a.v[3])); }
template <class T>
inline VecF vload(const T* p) { return vmap([&](int i) { return to_float(p[i]); }); }
template <class T>
inline VecF vload_tail(const T* p, int n, float fill) { return vmap([&](int i) { return i < n ? to_float(p[i]) : fill; }); }
template <class T>
inline void vstore(T* p, VecF x) {
  for (int i = 0; i < kLanes; ++i) from_float(x.v[i], p + i);
}
template <class T>
inline void vstream(T* p, VecF x) { vstore(p, x); }  // portable code has no non-temporal store
inline void vstream_fence() {}
template <class T>
inline void vstore_tail(T* p, VecF x, int n) {
  for (int i = 0; i < n; ++i) from_float(x.v[i], p + i);
}
inline VecF vexp2(VecF x) { return vmap([&](int i) { return std::exp2(x.v[i]); }); }
inline VecF vexp2_16bit(VecF x) { return vexp2(x); }  // the portable path keeps libm's exp for every dtype
inline VecF vlog2_1p01(VecF u) { return vmap([&](int i) { return std::log1p(u.v[i]) * 1.4426950408889634f; }); }

}  // namespace fastdistill::cpu::scalar

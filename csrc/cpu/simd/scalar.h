// The portable path: the same vector interface with one lane, so kernels are written once.
#pragma once

namespace fastdistill::cpu::scalar {

struct VecF { float v; };
using Mask = bool;
constexpr int kLanes = 1;

inline VecF vset1(float x) { return {x}; }
inline VecF operator+(VecF a, VecF b) { return {a.v + b.v}; }
inline VecF operator-(VecF a, VecF b) { return {a.v - b.v}; }
inline VecF operator*(VecF a, VecF b) { return {a.v * b.v}; }
inline VecF vfma(VecF a, VecF b, VecF c) { return {std::fma(a.v, b.v, c.v)}; }
inline VecF vmax(VecF a, VecF b) { return {a.v > b.v ? a.v : b.v}; }
inline VecF vabs(VecF a) { return {std::fabs(a.v)}; }
inline Mask vgt(VecF a, VecF b) { return a.v > b.v; }
inline VecF vselect(Mask m, VecF a, VecF b) { return m ? a : b; }
inline float vsum(VecF a) { return a.v; }
inline float vmaxall(VecF a) { return a.v; }
template <class T>
inline VecF vload(const T* p) { return {to_float(*p)}; }
template <class T>
inline VecF vload_tail(const T* p, int n, float fill) { return {n > 0 ? to_float(*p) : fill}; }
template <class T>
inline void vstore(T* p, VecF x) { from_float(x.v, p); }
template <class T>
inline void vstore_tail(T* p, VecF x, int n) { if (n > 0) from_float(x.v, p); }
inline VecF vexp(VecF x) { return {std::exp(x.v)}; }
inline VecF vlog1p01(VecF u) { return {std::log1p(u.v)}; }

}  // namespace fastdistill::cpu::scalar

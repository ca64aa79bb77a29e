// Torch-free definitions shared by CPU kernels, CUDA kernels and the SIMT emulator.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdistill {

// A GPU stream as the torch-free launchers take it: a cudaStream_t on CUDA, null in the SIMT emulator.
using GpuStream = void*;

// Storage dtypes as the kernels see them. bf16/fp16 are raw 16-bit patterns; kernels load them,
// compute in fp32 and store back with round-to-nearest-even.
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

FD_HD float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
FD_HD uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

FD_HD float to_float(float x) { return x; }
FD_HD float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
FD_HD float to_float(f16_t x) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t(x.bits) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // inf / nan
  } else if (exp == 0) {      // zero / subnormal: renormalise through float arithmetic
    o += 1u << 23;
    o = float_to_bits(bits_to_float(o) - bits_to_float(113u << 23));
  }
  return bits_to_float(o | ((uint32_t(x.bits) & 0x8000u) << 16));
}

FD_HD void from_float(float x, float* out) { *out = x; }
FD_HD void from_float(float x, bf16_t* out) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) { out->bits = uint16_t((u >> 16) | 0x40u); return; }  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  out->bits = uint16_t(u >> 16);
}
FD_HD void from_float(float x, f16_t* out) {
  uint32_t u = float_to_bits(x);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (143u << 23)) {                 // >= 65536: inf, or nan
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {           // result is subnormal or zero: let the FPU round
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = float_to_bits(bits_to_float(u) + bits_to_float(magic)) - magic;
  } else {                                 // normal: rebias and round to nearest even
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu + mant_odd;
    o = u >> 13;
  }
  out->bits = uint16_t(o | (sign >> 16));
}

// A tensor of shape (..., inner_dims..., V) with unit stride on V, seen as rows: row r starts at
// (r / inner) * stride_outer + (r % inner) * stride_inner. Two levels cover every view that
// torch can express after coalescing all but one leading dim (e.g. logits[:, :-1, :]).
struct RowLayout {
  int64_t inner = 1;
  int64_t stride_outer = 0;
  int64_t stride_inner = 0;
  FD_HD int64_t offset(int64_t row) const { return (row / inner) * stride_outer + (row % inner) * stride_inner; }
};

}  // namespace fastdistill

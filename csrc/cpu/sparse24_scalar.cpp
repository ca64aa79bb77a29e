// 2:4 sparse kernels, scalar level: the definition the SIMD paths are checked against.
#include "cpu/simd/prelude.h"
#include "cpu/sparse24_kernels.h"

namespace fastdistill::cpu::sparse24::scalar {

namespace {
inline float load_value(const void* values, DType dt, int64_t i) {
  switch (dt) {
    case DType::bf16: return to_float(static_cast<const bf16_t*>(values)[i]);
    case DType::f16: return to_float(static_cast<const f16_t*>(values)[i]);
    default: return static_cast<const float*>(values)[i];
  }
}
}  // namespace

void float_linear(const FloatParams& p, int64_t n0, int64_t n1) {
  const int64_t half = p.K / 2, mbytes = (p.K + 7) / 8, groups = p.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* meta = p.meta + n * mbytes;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.ldx;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const unsigned code = (meta[g >> 1] >> ((g & 1) * 4)) & 15u;
        acc += x[4 * g + (code & 3)] * load_value(p.values, p.values_dtype, n * half + 2 * g);
        acc += x[4 * g + (code >> 2)] * load_value(p.values, p.values_dtype, n * half + 2 * g + 1);
      }
      p.out[m * p.ldo + n] += acc;
    }
  }
}

void int8_linear(const Int8Params& p, int64_t n0, int64_t n1) {
  const int64_t half = p.K / 2, mbytes = (p.K + 7) / 8, groups = p.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* meta = p.meta + n * mbytes;
    const int8_t* v = p.values + n * half;
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* x = p.xq + m * p.ldx;
      int32_t acc = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const unsigned code = (meta[g >> 1] >> ((g & 1) * 4)) & 15u;
        acc += int32_t(x[4 * g + (code & 3)]) * v[2 * g] + int32_t(x[4 * g + (code >> 2)]) * v[2 * g + 1];
      }
      p.out[m * p.ldo + n] = float(acc) * (p.x_scales[m] * p.w_scales[n]) + (p.bias ? p.bias[n] : 0.f);
    }
  }
}

extern const Sparse24Kernels kernels{float_linear, int8_linear, nullptr};

}  // namespace fastdistill::cpu::sparse24::scalar

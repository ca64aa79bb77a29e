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
inline int64_t round_up16(int64_t a) { return (a + 15) / 16 * 16; }
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
      p.out[m * p.ldo + n] = int8_epilogue(acc, p.x_scales[m], p.w_scales[n], p.bias, n);
    }
  }
}

void unpack_int8_panel(const int8_t* values, const uint8_t* meta, int64_t K, int64_t n0, int64_t cols, int8_t* panel,
                       int32_t* wsum) {
  const int64_t half = K / 2, mbytes = (K + 7) / 8, groups = K / 4;
  constexpr int64_t kTile = 16, kGroup = 4;  // the int8 family's kNB, kKG
  for (int64_t j = 0; j < round_up16(cols); ++j) {
    int8_t* tile = panel + (j / kTile) * K * kTile + (j % kTile) * kGroup;
    if (j >= cols) {
      for (int64_t g = 0; g < groups; ++g) std::memset(tile + g * kTile * kGroup, 0, kGroup);
      continue;
    }
    const int8_t* v = values + (n0 + j) * half;
    const uint8_t* m = meta + (n0 + j) * mbytes;
    int32_t sum = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const unsigned code = (m[g >> 1] >> ((g & 1) * 4)) & 15u;
      int8_t* d = tile + g * kTile * kGroup;
      std::memset(d, 0, kGroup);
      d[code & 3] = v[2 * g];
      d[code >> 2] = v[2 * g + 1];
      sum += v[2 * g] + v[2 * g + 1];
    }
    wsum[j] = sum;
  }
}

extern const Sparse24Kernels kernels{float_linear, int8_linear, false, unpack_int8_panel, nullptr};

}  // namespace fastdistill::cpu::sparse24::scalar

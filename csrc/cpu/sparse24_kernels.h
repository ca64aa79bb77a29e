// The 2:4 CPU kernels' parameters and kernel table (one per ISA level: sparse24_{scalar,avx2,avx512}.cpp), shared
// by the registration (sparse24_cpu.cpp). Weights are in the canonical 2:4 format: values
// [N, K/2] (kept entries in ascending column order) and meta uint8 [N, ceil(K/8)] (per group of 4
// columns idx0 | idx1 << 2, two groups per byte, low nibble first). For a 32-bit little-endian load
// of meta covering 8 groups, kept value j of that chunk sits at column 4 * (j / 2) + ((m >> 2j) & 3).
// The kernels gather the activations each kept value needs; they never build a dense weight.
#pragma once
#include <cstdint>

#include "cpu/cpu_isa.h"
#include "fastdistill/common.h"

namespace fastdistill::cpu::sparse24 {

// Activation rows are zero-padded to ldx >= round_up(K, kXPad) so that full-width loads never run
// past the row; value/meta tails are handled inside the kernels.
constexpr int64_t kXPad = 128;

struct FloatParams {
  const float* x = nullptr;    // [M, ldx] fp32, zero-padded beyond K
  int64_t ldx = 0;
  const void* values = nullptr;  // [N, K/2] in values_dtype
  DType values_dtype = DType::f32;
  const uint8_t* meta = nullptr;  // [N, ceil(K/8)]
  int64_t M = 0, N = 0, K = 0;
  float* out = nullptr;        // [M, ldo] fp32, holds the bias (or 0) on entry; the kernel adds
  int64_t ldo = 0;
  // Optional (AVX-512, large M): x transposed in blocks of kXtRows rows, [ceil(M/kXtRows)][ldx][kXtRows],
  // zero-padded. With it each kept value is one broadcast times a contiguous row of activations.
  const float* xt = nullptr;
};
constexpr int64_t kXtRows = 64;
constexpr int64_t kXtMinM = 32;  // the glue builds xt for M >= this
constexpr int64_t kXtCols = 384;  // output columns per large-M task

struct Int8Params {
  const int8_t* xq = nullptr;  // [M, ldx] per-token quantized activations (u8 = s8 + 128 where the table's
                               // int8_u8_activations), padded with (quantized) zeros
  int64_t ldx = 0;
  const float* x_scales = nullptr;  // [M]
  const int8_t* values = nullptr;   // [N, K/2]
  const uint8_t* meta = nullptr;    // [N, ceil(K/8)]
  const float* w_scales = nullptr;  // [N]
  const float* bias = nullptr;      // [N] or null
  int64_t M = 0, N = 0, K = 0;
  float* out = nullptr;  // [M, ldo] fp32 (written, not accumulated)
  int64_t ldo = 0;
};

// The int8 epilogue of every 2:4 path (each kernel level and the decompress route): float(dot) * (x_scale *
// w_scale) + bias, rounded after the multiply and after the add. The empty asm stops the compiler from contracting
// the two into an FMA in some instantiations and not others (it did: 1-ulp differences between the blocked and
// M = 1 kernels on avx512).
inline float int8_epilogue(int32_t dot, float x_scale, float w_scale, const float* bias, int64_t n) {
  float v = float(dot) * (x_scale * w_scale);
#if defined(__x86_64__)
  asm("" : "+x"(v));
#endif
  return v + (bias ? bias[n] : 0.f);
}

// A row of int8_epilogue over columns [n0, n0 + cols): the products, then the adds, through memory, so that
// neither is contracted and both loops vectorise.
inline void int8_epilogue_row(const int32_t* dot, int64_t cols, float x_scale, const float* w_scales,
                              const float* bias, int64_t n0, float* out) {
  for (int64_t j = 0; j < cols; ++j) out[j] = float(dot[j]) * (x_scale * w_scales[n0 + j]);
#if defined(__x86_64__)
  asm volatile("" : : "r"(out) : "memory");
#endif
  if (bias != nullptr) {
    for (int64_t j = 0; j < cols; ++j) out[j] += bias[n0 + j];
  } else {
    for (int64_t j = 0; j < cols; ++j) out[j] += 0.f;  // as int8_epilogue: -0 becomes +0
  }
}

struct Sparse24Kernels {
  // Each computes the output columns [n0, n1) for every row, over disjoint column ranges from several threads;
  // the result of one column never depends on the partition.
  void (*float_linear)(const FloatParams& p, int64_t n0, int64_t n1);
  void (*int8_linear)(const Int8Params& p, int64_t n0, int64_t n1);
  bool int8_u8_activations;  // int8_linear takes u8 = s8 + 128 activations (quantized so, not flipped per load)
  // The int8 decompress route (sparse24_cpu.cpp): weight rows [n0, n0 + cols) (cols <= 64) written as a dense
  // panel in the int8 family's packed layout (cpu/int8_kernels.h: tiles of 16 rows, each [K/4][16][4] bytes, k_pad
  // = K, rows beyond cols zero), and wsum[j] = the sum of row n0 + j's values (the VNNI +128 correction).
  void (*unpack_int8_panel)(const int8_t* values, const uint8_t* meta, int64_t K, int64_t n0, int64_t cols,
                            int8_t* panel, int32_t* wsum);
  // Large M: one block of FloatParams::xt, dst[k * kXtRows + r] = x[r * ldx + k] for r < rows (zero for
  // rows <= r < kXtRows), k in [k0, k1) (multiples of 16); null where float_linear has no transposed path.
  void (*transpose_to_xt)(const float* x, int64_t ldx, int64_t rows, int64_t k0, int64_t k1, float* dst);
};

namespace scalar {
extern const Sparse24Kernels kernels;
void unpack_int8_panel(const int8_t* values, const uint8_t* meta, int64_t K, int64_t n0, int64_t cols, int8_t* panel,
                       int32_t* wsum);
}  // namespace scalar
#if defined(__x86_64__)
namespace avx2 { extern const Sparse24Kernels kernels; }
namespace avx512 { extern const Sparse24Kernels kernels; }
#endif

inline IsaTables<Sparse24Kernels> sparse24_tables() {
#if defined(__x86_64__)
  return {&scalar::kernels, &avx2::kernels, &avx512::kernels, nullptr};
#else
  return {&scalar::kernels, nullptr, nullptr, nullptr};
#endif
}

inline const Sparse24Kernels& sparse24_kernels() { return kernels_for(sparse24_tables()); }

}  // namespace fastdistill::cpu::sparse24

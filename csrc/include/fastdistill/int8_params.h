// Parameters of the int8 GPU kernels (int8.cuh): torch-free and CUDA-free, shared with the glue.
#pragma once
#include <cstdint>

#include "fastdistill/common.h"

namespace fastdistill::int8 {

constexpr int kKAlign = 16;
FD_HD int64_t padded_k(int64_t k) { return (k + kKAlign - 1) / kKAlign * kKAlign; }
// Elements of a GPU-packed [n, k] weight: [n, padded_k(k)] and padded_k(k) - k trailing zero bytes.
FD_HD int64_t packed_numel(int64_t n, int64_t k) { return n * padded_k(k) + (padded_k(k) - k); }

enum class OutKind : int { f32 = 0, bf16 = 1, f16 = 2, s32 = 3 };

struct QuantParams {
  const void* x = nullptr;  // [rows, k], row stride ldx elements
  int64_t rows = 0, k = 0, ldx = 0;
  int8_t* q = nullptr;      // [rows, ldq]; columns [k, k_pad) are zeroed
  int64_t ldq = 0, k_pad = 0;
  float* scales = nullptr;  // [rows]
};

struct GemvParams {
  const int8_t* qx = nullptr;   // [m, k_pad] quantised activations (zero padded)
  const float* x_scales = nullptr;
  const float* xf = nullptr;    // weight-only: [m, k_pad] fp32 activations (zero padded)
  const int8_t* w = nullptr;    // [n, k_pad]
  const float* w_scales = nullptr;  // [n] (ignored for s32 output)
  const float* bias = nullptr;  // [n] fp32 or null
  void* out = nullptr;          // [m, ldo]
  int64_t m = 0, n = 0, k_pad = 0, ldo = 0;
  OutKind out_kind = OutKind::f32;
};

constexpr int kGemvWarps = 4;  // warps (output columns in flight) per block

// Rows per tile for m rows: the smallest of 1, 2, 4, 8, 16 that covers m (16 beyond).
inline int gemv_tile_rows(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

}  // namespace fastdistill::int8

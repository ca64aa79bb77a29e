// Torch-free 2:4 sparse x dense kernels (CPU). Weights are in the canonical 2:4 format: values
// [N, K/2] (kept entries in ascending column order) and meta uint8 [N, ceil(K/8)] (per group of 4
// columns idx0 | idx1 << 2, two groups per byte, low nibble first). For a 32-bit little-endian load
// of meta covering 8 groups, kept value j of that chunk sits at column 4 * (j / 2) + ((m >> 2j) & 3).
// The kernels gather the activations each kept value needs; they never build a dense weight.
#pragma once
#include <cstdint>

namespace fastdistill::cpu::sparse24 {

// Activation rows are zero-padded to ldx >= round_up(K, kXPad) so that full-width loads never run
// past the row; value/meta tails are handled inside the kernels.
constexpr int64_t kXPad = 128;

struct FloatParams {
  const float* x = nullptr;    // [M, ldx] fp32, zero-padded beyond K
  int64_t ldx = 0;
  const void* values = nullptr;  // [N, K/2] fp32 or bf16 (raw bits)
  bool values_bf16 = false;
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
  const int8_t* xq = nullptr;  // [M, ldx] int8 per-token quantized activations, zero-padded
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

// Each computes the output columns [n0, n1) for every row. Called from at::parallel_for over
// disjoint column ranges; the result of one column never depends on the partition.
#define FD_SPARSE24_DECLARE(isa)                                                     \
  namespace isa {                                                                    \
  void float_linear(const FloatParams& p, int64_t n0, int64_t n1);                   \
  void int8_linear(const Int8Params& p, int64_t n0, int64_t n1);                     \
  }
FD_SPARSE24_DECLARE(scalar)
FD_SPARSE24_DECLARE(avx2)
FD_SPARSE24_DECLARE(avx512)
#undef FD_SPARSE24_DECLARE

namespace avx512 {
// One block of p.xt: dst[k * kXtRows + r] = x[r * ldx + k] for r < rows (zero for rows <= r < kXtRows),
// k in [k0, k1); k0 and k1 are multiples of 16.
void transpose_to_xt(const float* x, int64_t ldx, int64_t rows, int64_t k0, int64_t k1, float* dst);
}  // namespace avx512

}  // namespace fastdistill::cpu::sparse24

// int8 quantized inference, CPU kernels: torch-free declarations shared by the glue
// (int8_cpu.cpp) and the per-ISA kernel files (int8_avx512.cpp, int8_avx2.cpp, int8_scalar.cpp).
//
// Packed weight layout (CPU, ISA-independent, so switching ISA at run time needs no repack):
//   [0, 64)                 PackedHeader (magic "FDI8", version, n, k, n_pad, k_pad)
//   [64, 64 + 4 n_pad)      int32 comp[n_pad] = 128 * sum_k w[n][k] (VNNI u8 x s8 compensation)
//   [.., + n_pad k_pad)     int8 tiles: for each block of 16 columns, for each group of 4 k,
//                           16 x 4 bytes [col][k % 4] (the vpdpbusd operand order). Padding is 0.
// n_pad = round_up(n, 16), k_pad = round_up(k, 4). Block b starts at data + b * k_pad * 16.
#pragma once
#include <cstdint>

#include "fastdistill/common.h"

namespace fastdistill::cpu::int8 {

constexpr int64_t kHeaderBytes = 64;
constexpr int64_t kNB = 16;  // columns per tile
constexpr int64_t kKG = 4;   // k values per 32-bit lane
constexpr uint32_t kMagic = 0x38494446u;  // "FDI8"
constexpr uint32_t kVersion = 1;

struct PackedHeader {
  uint32_t magic, version;
  int64_t n, k, n_pad, k_pad;
};
static_assert(sizeof(PackedHeader) <= kHeaderBytes, "header too large");

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t packed_bytes(int64_t n, int64_t k) {
  const int64_t np = round_up(n, kNB), kp = round_up(k, kKG);
  return kHeaderBytes + 4 * np + np * kp;
}
inline const int32_t* packed_comp(const int8_t* packed) {
  return reinterpret_cast<const int32_t*>(packed + kHeaderBytes);
}
inline const int8_t* packed_data(const int8_t* packed, int64_t n_pad) { return packed + kHeaderBytes + 4 * n_pad; }

// Row quantisation: q[r][0:k] = clamp(rne(x / s), -127, 127) ^ xor_mask, s = amax / 127
// (s = 0 and q = 0 ^ xor_mask for a row of zeros); q[r][k:k_pad) = 0 ^ xor_mask.
struct QuantParams {
  DType dtype;
  const void* x;
  int64_t ldx;     // elements between rows of x
  int64_t k;
  int64_t k_pad;   // columns written to q (>= k)
  int8_t* q;
  int64_t ldq;
  float* scales;
  uint8_t xor_mask;  // 0x80 turns s8 into the u8 (+128) operand of vpdpbusd
};

// C[m][n] = sum_k A[m][k] * W[n][k] (exact int32), then either stored as int32 or
// y = fma(float(C), x_scales[m] * w_scales[n], bias[n]) stored in out_dtype.
struct GemmParams {
  const int8_t* a;      // [M][lda] quantised activations; u8 (s8 ^ 0x80) when shifted
  int64_t lda;
  bool shifted;         // a holds u8 = s8 + 128: subtract comp (VNNI path)
  const int8_t* w;      // packed tiles (packed_data)
  const int32_t* comp;  // packed_comp
  int64_t n, k_pad;
  int32_t* out_s32;     // non-null: exact int32 output
  void* out;            // else floating output
  DType out_dtype;
  int64_t ldo;
  const float* x_scales;
  const float* w_scales;
  const float* bias;    // fp32 [n] or null
};

// Weight-only: y[m][n] = fma(sum_k x[m][k] * w[n][k], w_scales[n], bias[n]) (fp32 accumulation).
struct WoParams {
  const float* x;       // [M][ldx] fp32, columns [k, k_pad) are 0 (null when xb is used)
  const bf16_t* xb;     // or [M][ldx] bf16 (bf16 inputs on CPUs with avx512bf16; exact products)
  int64_t ldx;
  const int8_t* w;
  int64_t n, k_pad;
  const float* w_scales;
  const float* bias;
  void* out;
  DType out_dtype;
  int64_t ldo;
};

// ISA-neutral helpers (int8_scalar.cpp).
void pack_blocks(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int8_t* packed, int64_t b0, int64_t b1);
void write_header(int8_t* packed, int64_t n, int64_t k);
void unpack_rows(const int8_t* packed, int8_t* w, int64_t r0, int64_t r1);
// Per-channel weight quantisation of rows [r0, r1); returns false if a non-finite value was seen.
bool quantize_channel_rows(DType dtype, const void* w, int64_t ldw, int64_t k, int8_t* q, float* scales,
                           int64_t r0, int64_t r1);

#define FD_INT8_DECLARE_ISA(ns)                                                              \
  namespace ns {                                                                             \
  void quantize_rows(const QuantParams& p, int64_t r0, int64_t r1);                          \
  void gemm_s8(const GemmParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);       \
  void gemm_wo(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);         \
  }
FD_INT8_DECLARE_ISA(scalar)
FD_INT8_DECLARE_ISA(avx2)
FD_INT8_DECLARE_ISA(avx512)
#undef FD_INT8_DECLARE_ISA

}  // namespace fastdistill::cpu::int8

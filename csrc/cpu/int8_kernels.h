// int8 quantized inference, CPU kernels: the packed-weight layout, the kernels' parameters and the kernel table
// (one per ISA level: int8_{scalar,avx2,avx512,avx512bf16,amx}.cpp), shared by the registration (int8_cpu.cpp).
//
// Packed weight layout (CPU, ISA-independent, so switching ISA at run time needs no repack):
//   [0, 64)                 PackedHeader (magic "FDI8", version, n, k, n_pad, k_pad)
//   [64, 64 + 4 n_pad)      int32 comp[n_pad] = 128 * sum_k w[n][k] (VNNI u8 x s8 compensation)
//   [.., + n_pad k_pad)     int8 tiles: for each block of 16 columns, for each group of 4 k,
//                           16 x 4 bytes [col][k % 4] (the vpdpbusd operand order). Padding is 0.
// n_pad = round_up(n, 16), k_pad = round_up(k, 4). Block b starts at data + b * k_pad * 16.
#pragma once
#include <cstdint>

#include "cpu/cpu_isa.h"
#include "fastdistill/common.h"
#include "fastdistill/int8.h"

namespace fastdistill::cpu::int8 {

using fastdistill::int8::Activation;
using fastdistill::int8::QuantParams;

constexpr int64_t kHeaderBytes = 64;
constexpr int64_t kNB = 16;  // columns per tile
constexpr int64_t kKG = 4;   // k values per 32-bit lane
// int32 accumulators: K * 255 * 127 (u8 x s8 dot products) must stay below 2^31.
constexpr int64_t kMaxK = 65536;
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

// C[m][n] = sum_k A[m][k] * W[n][k] (exact int32), then either stored as int32 or
// y = act(fma(float(C), x_scales[m] * w_scales[n], bias[n])) stored in out_dtype.
struct GemmParams {
  const int8_t* a;      // [M][lda] quantised activations; u8 (s8 ^ 0x80) when shifted
  int64_t lda;
  bool shifted;         // a holds u8 = s8 + 128: subtract comp (Int8Kernels::u8_activations)
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
  Activation act;       // after the bias (fastdistill/int8.h)
};

// Weight-only: y[m][n] = fma(sum_k x[m][k] * w[n][k], w_scales[n], bias[n]) (fp32 accumulation).
struct WoParams {
  const float* x;       // [M][ldx] fp32, columns [k, k_pad) are 0 (gemm_wo)
  const bf16_t* xb;     // or [M][ldx] bf16 (gemm_wo_bf16: exact products)
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

// Tasks (int8_cpu.cpp) cover kTileRows rows x kPanelCols columns; the kernels block inside them.
constexpr int64_t kTileRows = 96;   // a multiple of every micro-kernel's rows
constexpr int64_t kPanelCols = 64;  // 4 tiles of kNB columns
constexpr int64_t kPanelBlocks = kPanelCols / kNB;
constexpr int64_t kWoSliceK = 256;  // k values of a weight slice dequantised once for many rows (weight-only)

struct Int8Kernels {
  void (*quantize_rows)(const QuantParams& p, int64_t r0, int64_t r1);
  // Rows [m0, m1) x column tiles [nb0, nb1) of the dynamic W8A8 GEMM (and its epilogue): gemm_s8_panel over
  // panels of kPanelBlocks tiles and chunks of kTileRows rows, then epilogue_s8.
  void (*gemm_s8)(const GemmParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
  // The micro-kernel level of gemm_s8, also called by the 2:4 family on panels it decompresses: exact int32 sums
  // c[i][j] (row stride kPanelCols) of rows [0, rows) of a (rows <= kTileRows, columns [0, k_pad)) times the
  // nblk <= kPanelBlocks tiles of a packed panel (tile t at panel + t * k_pad * kNB), without the compensation.
  void (*gemm_s8_panel)(const int8_t* a, int64_t lda, const int8_t* panel, int64_t k_pad, int nblk, int64_t rows,
                        int32_t* c);
  bool u8_activations;  // the GEMM takes u8 = s8 + 128 activations (u8 x s8 dot products) and subtracts comp
  void (*gemm_wo)(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
  // Weight-only with bf16 activations (native bf16 dot products), or null.
  void (*gemm_wo_bf16)(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
  // A W8A8 GEMM of fewer rows runs on the level below (int8_kernels_for_rows); 0: none.
  int64_t gemm_min_rows = 0;
};

#define FD_INT8_DECLARE_ISA(ns)                                                              \
  namespace ns {                                                                             \
  void quantize_rows(const QuantParams& p, int64_t r0, int64_t r1);                          \
  void gemm_s8(const GemmParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);       \
  void gemm_s8_panel(const int8_t* a, int64_t lda, const int8_t* panel, int64_t k_pad, int nblk, int64_t rows, \
                     int32_t* c);                                                            \
  void gemm_wo(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);         \
  extern const Int8Kernels kernels;                                                          \
  }
FD_INT8_DECLARE_ISA(scalar)
#if defined(__x86_64__)
FD_INT8_DECLARE_ISA(avx2)
FD_INT8_DECLARE_ISA(avx512)
namespace avx512bf16 { extern const Int8Kernels kernels; }
namespace amx { extern const Int8Kernels kernels; }
#endif
#undef FD_INT8_DECLARE_ISA

inline IsaTables<Int8Kernels> int8_tables() {
#if defined(__x86_64__)
  return {&scalar::kernels, &avx2::kernels, &avx512::kernels, &avx512bf16::kernels, &amx::kernels};
#else
  return {&scalar::kernels, nullptr, nullptr, nullptr, nullptr};
#endif
}

inline const Int8Kernels& int8_kernels() { return kernels_for(int8_tables()); }

// The table whose W8A8 GEMM takes m rows: the level in force, or the one below where the level's GEMM loses at
// that size (AMX tiles against VNNI below 3 rows). The caller keeps to one table per call: u8_activations and
// the operand it quantizes belong to it.
inline const Int8Kernels& int8_kernels_for_rows(int64_t m) {
  const IsaTables<Int8Kernels> tables = int8_tables();
  const CpuIsa level = kernels_level(tables);
  const Int8Kernels& kern = *tables[int(level)];
  return m < kern.gemm_min_rows ? kernels_for(tables, CpuIsa(int(level) - 1)) : kernels_for(tables, level);
}

}  // namespace fastdistill::cpu::int8

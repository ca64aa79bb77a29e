// int8 Conv2d, CPU kernels (NHWC): the conv packed-weight layout, the kernels' parameters and the kernel table (one
// per ISA level: conv_{scalar,avx2,avx512}.cpp; the levels above avx512 use its table), shared by the registration
// (conv_cpu.cpp). The GEMM itself is the int8 family's: the implicit GEMM packs A rows straight from the quantised
// NHWC input, one tile of output pixels at a time (no im2col of the whole input), and runs the int8 table's
// gemm_s8_panel on them.
//
// Packed conv weight (CPU, ISA-independent):
//   [0, 64)   ConvHeader (magic "FDC8", version, cout, cin, kh, kw, groups)
//   groups == 1: then the int8 GEMM packed weight (int8_kernels.h, its own header included) of the [cout, K]
//             matrix with K = kh * kw * cin_pad ordered (kh, kw, cin), cin_pad = round_up(cin, 4), 0 at the padding
//             channels: each tap of an A row is one cin_pad-byte input pixel.
//   depthwise (groups == cin == cout): int32 [kh * kw][c_pad], c_pad = round_up(c, 16), the weight in the low 16 bits
//             and 0 in the high ones: x sign-extended to 32 bits, times it in vpmaddwd / vpdpwssd, gives x * w
//             exactly (the high halves' product is 0).
#pragma once
#include <cstdint>

#include "cpu/int8_kernels.h"

namespace fastdistill::cpu::conv {

using int8::Activation;
using int8::Int8Kernels;

constexpr int64_t kHeaderBytes = 64;
constexpr int64_t kCinAlign = 4;   // groups == 1: channels per tap, padded to a VNNI group
constexpr int64_t kDwAlign = 16;   // depthwise: channels padded to a 16-lane vector
constexpr uint32_t kMagic = 0x38434446u;  // "FDC8"
constexpr uint32_t kVersion = 1;

struct ConvHeader {
  uint32_t magic, version;
  int64_t cout, cin, kh, kw, groups;
};
static_assert(sizeof(ConvHeader) <= kHeaderBytes, "header too large");

inline int64_t gemm_k(int64_t cin, int64_t kh, int64_t kw) { return kh * kw * int8::round_up(cin, kCinAlign); }
inline int64_t packed_bytes(int64_t cout, int64_t cin, int64_t kh, int64_t kw, int64_t groups) {
  if (groups == 1) return kHeaderBytes + int8::packed_bytes(cout, gemm_k(cin, kh, kw));
  return kHeaderBytes + 4 * kh * kw * int8::round_up(cout, kDwAlign);
}

struct ConvParams {
  int64_t n = 0, h = 0, w = 0, c = 0;     // input, NHWC
  int64_t oh = 0, ow = 0, cout = 0;       // output, NHWC: pixel m = (b * oh + y) * ow + x, row stride cout
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  const int8_t* q = nullptr;  // quantised input [n * h * w][ldq] (u8 = s8 + 128 when shifted)
  int64_t ldq = 0;            // cin_pad (GEMM) or c_pad (depthwise)
  int8_t zero = 0;            // the quantised 0 (0, or 0x80 when shifted): what padding taps read
  float x_scale = 0.f;
  // groups == 1
  const Int8Kernels* gemm = nullptr;  // the int8 table whose gemm_s8_panel runs the tiles
  bool shifted = false;               // its u8_activations: comp is subtracted
  const int8_t* tiles = nullptr;      // packed tiles (int8::packed_data)
  const int32_t* comp = nullptr;
  int64_t k_pad = 0;                  // = gemm_k
  // depthwise
  const int32_t* dw_w = nullptr;
  // epilogue: y = act(fma(float(acc), x_scale * w_scales[n], bias[n]) + residual[m][n])
  const float* w_scales = nullptr;
  const float* bias = nullptr;        // fp32 [cout] or null
  const void* residual = nullptr;     // [m][cout] in out_dtype, or null
  void* out = nullptr;                // [m][cout]
  DType out_dtype = DType::f32;
  Activation act = Activation::none;  // none, relu or relu6 (glue/int8.h's parse_activation)
};

// Tasks (conv_cpu.cpp) are output pixel ranges of whole kTileRows tiles (the last one short) x panel ranges.
struct ConvKernels {
  // Output pixels [m0, m1) x column tiles [nb0, nb1) of the implicit GEMM (groups == 1).
  void (*gemm_rows)(const ConvParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
  // Output pixels [m0, m1), every channel, of the depthwise conv.
  void (*depthwise)(const ConvParams& p, int64_t m0, int64_t m1);
};

#define FD_CONV_DECLARE_ISA(ns) \
  namespace ns {                \
  extern const ConvKernels kernels; \
  }
FD_CONV_DECLARE_ISA(scalar)
#if defined(__x86_64__)
FD_CONV_DECLARE_ISA(avx2)
FD_CONV_DECLARE_ISA(avx512)
#endif
#undef FD_CONV_DECLARE_ISA

inline IsaTables<ConvKernels> conv_tables() {
#if defined(__x86_64__)
  return {&scalar::kernels, &avx2::kernels, &avx512::kernels, nullptr, nullptr};
#else
  return {&scalar::kernels, nullptr, nullptr, nullptr, nullptr};
#endif
}

inline const ConvKernels& conv_kernels() { return kernels_for(conv_tables()); }

}  // namespace fastdistill::cpu::conv

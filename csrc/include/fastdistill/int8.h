// int8 quantized inference: torch-free parameters shared by the CPU kernels, the GPU kernels (int8.cuh)
// and the SIMT emulator, the GPU packed-weight layout and the GPU launchers (cuda/int8.cu).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastdistill/common.h"

namespace fastdistill::int8 {

// Per-row symmetric quantisation: q[r][0:k] = clamp(rne(x / s), -127, 127) ^ xor_mask, s = amax / 127
// (s = 0 and q = 0 ^ xor_mask for a row of zeros); q[r][k:k_pad) = 0 ^ xor_mask. With fixed_scale (CPU only: the
// static per-tensor activations of int8 Conv2d) every row uses s = *fixed_scale and scales is not written.
struct QuantParams {
  DType dtype = DType::f32;
  const void* x = nullptr;  // [rows, ldx] elements of dtype
  int64_t rows = 0, ldx = 0, k = 0;
  int64_t k_pad = 0;        // columns written to q (>= k)
  int8_t* q = nullptr;      // [rows, ldq]
  int64_t ldq = 0;
  float* scales = nullptr;  // [rows]
  uint8_t xor_mask = 0;     // 0x80 turns s8 into the u8 (+128) operand of u8 x s8 dot products
  const float* fixed_scale = nullptr;
};

// The activation of the int8 epilogues (int8_linear, int8_conv2d), applied in fp32 after the bias (and the residual),
// before the output's rounding. Names and which op takes which: glue/int8.h's parse_activation.
enum class Activation : int { none = 0, relu = 1, gelu = 2, gelu_tanh = 3, relu6 = 4 };

// Plain float arithmetic with explicit fmas, written once for every device: the CPU epilogue (each ISA level's copy
// auto-vectorizes it and, with no contraction in ISO C++, computes the same bits), the CUDA kernels and the emulator.
// e^x for x clamped to [-87, 88] (Cephes expf: Cody-Waite reduction, degree-5 polynomial, 2^n from the exponent bits).
FD_HD float exp_clamped(float x) {
  x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;  // (selects, not fminf: they vectorize)
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float e = fmaf(p, r * r, r) + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return e * scale;
}

// gelu(v) = v * Phi(v), Phi(v) = erfc(-v / sqrt 2) / 2, with erfc(t) = poly(1 / (1 + p t)) e^(-t^2) for t >= 0
// (Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7, the form PyTorch's CPU erf uses); taking the small side as erfc
// itself avoids 1 + erf's cancellation for negative v. gelu_tanh(v) = v / (1 + e^(-2u)), u = sqrt(2 / pi)
// (v + 0.044715 v^3): the tanh form's 0.5 (1 + tanh u) is the logistic of 2u.
FD_HD float activate(Activation a, float v) {
  switch (a) {
    case Activation::relu: return v < 0.f ? 0.f : v;  // (NaN stays NaN, as in torch.relu)
    case Activation::relu6: return v < 0.f ? 0.f : v > 6.f ? 6.f : v;
    case Activation::gelu: {
      const float t = fabsf(v) * 0.707106781186547524f;
      const float s = 1.f / fmaf(0.3275911f, t, 1.f);
      float q = 1.061405429f;
      q = fmaf(q, s, -1.453152027f);
      q = fmaf(q, s, 1.421413741f);
      q = fmaf(q, s, -0.284496736f);
      q = fmaf(q, s, 0.254829592f);
      const float half_erfc = 0.5f * (q * s) * exp_clamped(-t * t);
      return v * (v < 0.f ? half_erfc : 1.f - half_erfc);
    }
    case Activation::gelu_tanh: {
      const float u = 0.797884560802865356f * fmaf(0.044715f * v, v * v, v);
      return v / (1.f + exp_clamped(-2.f * u));
    }
    default: return v;
  }
}

// ---- GPU ----
// Packed weight: int8 1-D of N * Kp + (Kp - K) elements, Kp = round_up(K, 16): [N, Kp] row-major, zero
// padded, then Kp - K zero bytes so that the size alone identifies K for a given N (N comes from w_scales,
// K from x: the ops validate a packed weight without reading it on the host).
constexpr int kKAlign = 16;
FD_HD int64_t padded_k(int64_t k) { return (k + kKAlign - 1) / kKAlign * kKAlign; }
FD_HD int64_t packed_numel(int64_t n, int64_t k) { return n * padded_k(k) + (padded_k(k) - k); }

enum class OutKind : int { f32 = 0, bf16 = 1, f16 = 2, s32 = 3 };
inline OutKind out_kind(DType t) { return t == DType::f32 ? OutKind::f32 : t == DType::bf16 ? OutKind::bf16 : OutKind::f16; }

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
  Activation act = Activation::none;  // W8A8 only
};

constexpr int kGemvWarps = 4;  // warps (output columns in flight) per block

// Rows per tile for m rows: the smallest of 1, 2, 4, 8, 16 that covers m (16 beyond).
inline int gemv_tile_rows(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

namespace gpu {
void quantize_rows(const QuantParams& p, GpuStream s);
// W8A8 (qx, x_scales) or weight-only (xf) GEMV tiles for every row of p.
void gemv(const GemvParams& p, bool weight_only, GpuStream s);
// out [rows, k_pad] fp32 = x [rows, ldx] of dtype t, zero padded beyond k.
void to_f32_padded(DType t, const void* x, int64_t rows, int64_t ldx, int64_t k, int64_t k_pad, float* out,
                   GpuStream s);
// out = act(fma(float(acc), x_scales[m] * w_scales[n], bias[n])) after a vendor int32 GEMM.
void dequant_epilogue(const int32_t* acc, int64_t m, int64_t n, const float* x_scales, const float* w_scales,
                      const float* bias, Activation act, void* out, OutKind kind, int max_blocks, GpuStream s);
}  // namespace gpu

}  // namespace fastdistill::int8

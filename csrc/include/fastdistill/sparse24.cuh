// 2:4 structured-sparse kernels written against simt.h (GPUs, and the CPU SIMT emulator in the tests).
//
// They read the canonical format directly: values [N, K/2] (kept entries in ascending
// column order) and meta uint8 [N, ceil(K/8)], per group of 4 columns the nibble idx0 | idx1 << 2, two
// groups per byte, low nibble first. K is a multiple of 4.
//
// GEMV (M <= 16 rows per tile): one warp per output column n. A lane takes 32 columns at a time (8
// groups = one 32-bit meta word and 16 values: 64 B fp32, 32 B bf16/fp16, 16 B int8, loaded as 16-byte
// packs when K % 32 == 0, element by element otherwise), gathers the 16 activations the meta names
// from the (L1-resident) activation rows and accumulates; warp sum; epilogue. The weight stream is
// N * K/2 values + N * K/8 meta bytes: 56% of a dense bf16 weight's bytes (int8: 31%).
// int8 values: activations quantised per token (int8.cuh), the gathered bytes go through __dp4a, and
// out = float(acc) * (s_x * s_w) + bias (no fma: the CPU op's rounding).
#pragma once
#include "fastdistill/int8.cuh"
#include "fastdistill/sparse24.h"
#include "fastdistill/simt.h"

#if !defined(__CUDACC__)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
#endif

namespace fastdistill::sparse24 {

constexpr int kWarps = 4;

template <class V>
FD_DEVICE float val_f(V v) { return to_float(v); }
template <>
FD_DEVICE float val_f<int8_t>(int8_t v) { return float(v); }

// Loads the 16 values of chunk c (columns 32c .. 32c+31) of row `vals`.
template <class V, bool VEC>
FD_DEVICE void load_values(const V* vals, int64_t c, V* out) {
  if constexpr (VEC) {
    constexpr int per = 16 / int(sizeof(V));  // elements per 16-byte pack
    for (int i = 0; i < 16 / per; ++i) {
      const auto pk = simt::load_pack<V, per>(vals + c * 16 + i * per);
      for (int j = 0; j < per; ++j) out[i * per + j] = pk.v[j];
    }
  } else {
    for (int i = 0; i < 16; ++i) out[i] = vals[c * 16 + i];
  }
}

// Meta word of chunk c: 4 bytes (8 groups); bytes beyond the row (K % 32 != 0) read as 0.
template <bool VEC>
FD_DEVICE uint32_t load_meta(const uint8_t* meta, int64_t c, int64_t meta_bytes) {
  if constexpr (VEC) {
    return simt::load_pack<uint32_t, 1>(reinterpret_cast<const uint32_t*>(meta) + c).v[0];
  } else {
    uint32_t w = 0;
    for (int i = 0; i < 4; ++i)
      if (c * 4 + i < meta_bytes) w |= uint32_t(meta[c * 4 + i]) << (8 * i);
    return w;
  }
}

// grid = (ceil(n / kWarps), ceil(m / MT)), block = 32 * kWarps. VEC: K % 32 == 0 and aligned rows.
template <class V, int MT, bool VEC>
FD_KERNEL void __launch_bounds__(32 * kWarps) sparse24_gemv_kernel(Sparse24Params p) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int64_t n = int64_t(blockIdx.x) * kWarps + warp;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const int mt = int(p.m - m0 < MT ? p.m - m0 : MT);
  if (n >= p.n) return;  // whole warps only
  const int64_t half = p.k / 2, meta_bytes = (p.k + 7) / 8;
  const V* vals = static_cast<const V*>(p.values) + n * half;
  const uint8_t* meta = p.meta + n * meta_bytes;
  const int64_t chunks = (p.k + 31) / 32;
  constexpr bool kInt = sizeof(V) == 1;
  float accf[MT];
  int acci[MT];
  for (int i = 0; i < MT; ++i) {
    accf[i] = 0.f;
    acci[i] = 0;
  }
  for (int64_t c = lane; c < chunks; c += 32) {
    const int groups = int(p.k / 4 - c * 8 < 8 ? p.k / 4 - c * 8 : 8);
    V v[16];
    if (VEC || groups == 8) {
      load_values<V, VEC>(vals, c, v);
    } else {  // the row's last, partial chunk
      for (int i = 0; i < 16; ++i) v[i] = i < 2 * groups ? vals[c * 16 + i] : V{};
    }
    const uint32_t mw = load_meta<VEC>(meta, c, meta_bytes);
    if constexpr (kInt) {
      // two groups per dp4a: values v[4j..4j+3] against the gathered activation bytes
      int wv[4];
      memcpy(wv, v, 16);
      for (int i = 0; i < MT; ++i) {
        if (i >= mt) continue;
        const int* xr = reinterpret_cast<const int*>(p.qx + (m0 + i) * p.k_pad) + c * 8;
        const auto x0 = simt::load_pack<int, 4>(xr);
        const auto x1 = simt::load_pack<int, 4>(xr + 4);
        int xw[8];
        for (int j = 0; j < 4; ++j) {
          xw[j] = x0.v[j];
          xw[4 + j] = x1.v[j];
        }
        for (int j = 0; j < 4; ++j) {
          uint32_t g = 0;
          for (int h = 0; h < 2; ++h) {
            const int grp = 2 * j + h;
            const uint32_t nib = (mw >> (4 * grp)) & 0xfu;
            const uint32_t b0 = (uint32_t(xw[grp]) >> (8 * (nib & 3u))) & 0xffu;
            const uint32_t b1 = (uint32_t(xw[grp]) >> (8 * (nib >> 2))) & 0xffu;
            g |= (b0 | (b1 << 8)) << (16 * h);
          }
          acci[i] = __dp4a(wv[j], int(g), acci[i]);
        }
      }
    } else {
      float wf[16];
      for (int j = 0; j < 16; ++j) wf[j] = val_f(v[j]);
      for (int i = 0; i < MT; ++i) {
        if (i >= mt) continue;
        const float* xr = p.xf + (m0 + i) * p.k_pad + c * 32;
        float a = accf[i];
        for (int grp = 0; grp < 8; ++grp) {
          const uint32_t nib = (mw >> (4 * grp)) & 0xfu;
          a = fmaf(wf[2 * grp], __ldg(xr + 4 * grp + (nib & 3u)), a);
          a = fmaf(wf[2 * grp + 1], __ldg(xr + 4 * grp + (nib >> 2)), a);
        }
        accf[i] = a;
      }
    }
  }
  for (int i = 0; i < MT; ++i) {
    if constexpr (kInt) acci[i] = int8::warp_sum_int(acci[i]);
    else accf[i] = simt::warp_sum(accf[i]);
  }
  for (int i = 0; i < MT; ++i) {
    if (lane == i && i < mt) {
      float y;
      if constexpr (kInt) {
        y = __fmul_rn(float(acci[i]), p.x_scales[m0 + i] * p.w_scales[n]);
        if (p.bias) y = __fadd_rn(y, p.bias[n]);
      } else {
        y = p.bias ? __fadd_rn(p.bias[n], accf[i]) : accf[i];
      }
      int8::store_out(p.out, (m0 + i) * p.ldo + n, p.out_kind, y);
    }
  }
}

// Decompression to a dense [n, k] row-major weight (the M > 16 fallback feeds cuBLAS with it; also the
// reference point of the format). One thread per group of 4 columns.
template <class V>
FD_KERNEL void sparse24_decompress_kernel(const V* values, const uint8_t* meta, int64_t n, int64_t k, V* dense) {
  const int64_t groups = n * (k / 4);
  const int64_t meta_bytes = (k + 7) / 8;
  for (int64_t gi = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; gi < groups;
       gi += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = gi / (k / 4), g = gi % (k / 4);
    const uint32_t nib = (meta[row * meta_bytes + g / 2] >> (4 * (g & 1))) & 0xfu;
    V out[4] = {V{}, V{}, V{}, V{}};
    out[nib & 3u] = values[row * (k / 2) + 2 * g];
    out[nib >> 2] = values[row * (k / 2) + 2 * g + 1];
    for (int j = 0; j < 4; ++j) dense[row * k + 4 * g + j] = out[j];
  }
}

}  // namespace fastdistill::sparse24

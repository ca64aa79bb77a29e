// int8 inference kernels written against simt.h (GPUs, and the CPU SIMT emulator in the tests).
//
// Semantics are the CPU ops' (symmetric, zero point 0): s = amax / 127 per row, q = clamp(rne(x / s),
// -127, 127) (a zero row has s = 0, q = 0); W8A8 out = act(fma(float(acc), s_x * s_w, bias)) (or
// act(float(acc) * (s_x * s_w)) without bias; act from fastdistill/int8.h), weight-only out = fma(acc, s_w, bias) with fp32 sums.
// Divisions are IEEE (__fdiv_rn) even under --use_fast_math so that quantised values match the CPU.
//
// GPU weight layout ("packed" on CUDA): int8 [N, Kp] row-major, Kp = round_up(K, 16), zero padded, so
// every row is a whole number of 16-byte chunks. Activations are quantised into [M, Kp] rows padded the
// same way, so the GEMV needs no K tail.
//
// GEMV (M <= 16 rows per block tile): one warp per output column n streams w[n, :] in 16-byte chunks
// (4 __dp4a per chunk per row), the M activation rows come from L1/L2, warp-sum, fused epilogue. It is
// bound by the weight stream: N * Kp bytes read once.
#pragma once
#include "fastdistill/common.h"
#include "fastdistill/int8.h"
#include "fastdistill/simt.h"

#if !defined(__CUDACC__)
inline float __fdiv_rn(float a, float b) { return a / b; }
#endif

namespace fastdistill::int8 {

FD_DEVICE int8_t quant1(float v, float s) {
  float r = rintf(__fdiv_rn(v, s));
  r = fminf(127.f, fmaxf(-127.f, r));
  return int8_t(int(r));
}

FD_DEVICE void store_out(void* out, int64_t i, OutKind kind, float v) {
  switch (kind) {
    case OutKind::f32: static_cast<float*>(out)[i] = v; break;
    case OutKind::bf16: from_float(v, static_cast<bf16_t*>(out) + i); break;
    case OutKind::f16: from_float(v, static_cast<f16_t*>(out) + i); break;
    default: break;
  }
}

FD_DEVICE float block_max(float v) {
  FD_SHARED(float, red, 32);
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, nwarps = int(blockDim.x) >> 5;
  v = simt::warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : 0.f;
  return simt::warp_max(v);  // every warp reduces the same values: all threads hold the result
}

// ------------------------------------------------------------------------ per-token quantisation
// One block per row; blockDim.x a multiple of 32.
template <class T>
FD_KERNEL void __launch_bounds__(1024) quantize_rows_kernel(QuantParams p) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.ldx;
  float amax = 0.f;
  for (int64_t j = threadIdx.x; j < p.k; j += blockDim.x) amax = fmaxf(amax, fabsf(to_float(x[j])));
  amax = block_max(amax);
  const float s = __fdiv_rn(amax, 127.f);
  if (threadIdx.x == 0) p.scales[row] = s;
  int8_t* q = p.q + row * p.ldq;
  for (int64_t j = threadIdx.x; j < p.k_pad; j += blockDim.x)
    q[j] = int8_t(uint8_t((j < p.k && s != 0.f) ? quant1(to_float(x[j]), s) : 0) ^ p.xor_mask);
}

// --------------------------------------------------------------------------------- W8A8 GEMV
FD_DEVICE int warp_sum_int(int x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// grid = (ceil(n / kGemvWarps), ceil(m / MT)), block = 32 * kGemvWarps. MT rows per tile.
template <int MT>
FD_KERNEL void __launch_bounds__(32 * kGemvWarps) int8_gemv_kernel(GemvParams p) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + warp;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const int mt = int(p.m - m0 < MT ? p.m - m0 : MT);
  if (n >= p.n) return;  // whole warps only: no block-level barrier below
  const int8_t* w = p.w + n * p.k_pad;
  int acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = 0;
  const int64_t chunks = p.k_pad / 16;
  int64_t c = lane;
  for (; c + 32 < chunks; c += 64) {  // two 16-byte weight loads in flight per lane
    const auto w0 = simt::load_pack<int, 4>(reinterpret_cast<const int*>(w + c * 16));
    const auto w1 = simt::load_pack<int, 4>(reinterpret_cast<const int*>(w + (c + 32) * 16));
    for (int i = 0; i < MT; ++i) {
      if (i < mt) {
        const int* xr = reinterpret_cast<const int*>(p.qx + (m0 + i) * p.k_pad);
        const auto x0 = simt::load_pack<int, 4>(xr + c * 4);
        const auto x1 = simt::load_pack<int, 4>(xr + (c + 32) * 4);
        for (int j = 0; j < 4; ++j) acc[i] = __dp4a(w0.v[j], x0.v[j], acc[i]);
        for (int j = 0; j < 4; ++j) acc[i] = __dp4a(w1.v[j], x1.v[j], acc[i]);
      }
    }
  }
  if (c < chunks) {
    const auto w0 = simt::load_pack<int, 4>(reinterpret_cast<const int*>(w + c * 16));
    for (int i = 0; i < MT; ++i) {
      if (i < mt) {
        const auto x0 = simt::load_pack<int, 4>(reinterpret_cast<const int*>(p.qx + (m0 + i) * p.k_pad) + c * 4);
        for (int j = 0; j < 4; ++j) acc[i] = __dp4a(w0.v[j], x0.v[j], acc[i]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) acc[i] = warp_sum_int(acc[i]);
  // lane i writes row i of the tile
  for (int i = 0; i < MT; ++i) {
    if (lane == i && i < mt) {
      const int64_t o = (m0 + i) * p.ldo + n;
      if (p.out_kind == OutKind::s32) {
        static_cast<int32_t*>(p.out)[o] = acc[i];
      } else {
        const float sc = p.x_scales[m0 + i] * p.w_scales[n];
        const float v = p.bias ? fmaf(float(acc[i]), sc, p.bias[n]) : float(acc[i]) * sc;
        store_out(p.out, o, p.out_kind, activate(p.act, v));
      }
    }
  }
}

// ------------------------------------------------------------------------- weight-only GEMV
// Activations converted once to fp32 [m, k_pad] (zero padded) by this kernel: one block per row.
template <class T>
FD_KERNEL void to_f32_padded_kernel(const void* x, int64_t ldx, int64_t k, int64_t k_pad, float* out) {
  const int64_t row = blockIdx.x;
  const T* xr = static_cast<const T*>(x) + row * ldx;
  for (int64_t j = threadIdx.x; j < k_pad; j += blockDim.x) out[row * k_pad + j] = j < k ? to_float(xr[j]) : 0.f;
}

template <int MT>
FD_KERNEL void __launch_bounds__(32 * kGemvWarps) int8_wo_gemv_kernel(GemvParams p) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + warp;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const int mt = int(p.m - m0 < MT ? p.m - m0 : MT);
  if (n >= p.n) return;
  const int8_t* w = p.w + n * p.k_pad;
  float acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = 0.f;
  const int64_t chunks = p.k_pad / 16;
  for (int64_t c = lane; c < chunks; c += 32) {
    const auto wp = simt::load_pack<int8_t, 16>(w + c * 16);
    float wf[16];
    for (int j = 0; j < 16; ++j) wf[j] = float(wp.v[j]);
    for (int i = 0; i < MT; ++i) {
      if (i < mt) {
        const float* xr = p.xf + (m0 + i) * p.k_pad + c * 16;
        for (int q = 0; q < 4; ++q) {
          const auto xv = simt::load_pack<float, 4>(xr + 4 * q);
          for (int j = 0; j < 4; ++j) acc[i] = fmaf(wf[4 * q + j], xv.v[j], acc[i]);
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i) acc[i] = simt::warp_sum(acc[i]);
  for (int i = 0; i < MT; ++i) {
    if (lane == i && i < mt) {
      const float v = p.bias ? fmaf(acc[i], p.w_scales[n], p.bias[n]) : acc[i] * p.w_scales[n];
      store_out(p.out, (m0 + i) * p.ldo + n, p.out_kind, v);
    }
  }
}

// ------------------------------------------------------- epilogue after torch._int_mm (M > 16)
// out[m, n] = act(fma(float(acc[m, n]), s_x[m] * s_w[n], bias[n])); grid-stride over m * n. (A template, as every
// kernel in a header is.)
template <class Acc>
FD_KERNEL void int8_dequant_epilogue_kernel(const Acc* acc, int64_t m, int64_t n, const float* x_scales,
                                            const float* w_scales, const float* bias, Activation act, void* out,
                                            OutKind kind) {
  const int64_t total = m * n;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i % n;
    const float sc = x_scales[r] * w_scales[c];
    const float v = bias ? fmaf(float(acc[i]), sc, bias[c]) : float(acc[i]) * sc;
    store_out(out, i, kind, activate(act, v));
  }
}

}  // namespace fastdistill::int8

// 2:4 structured sparsity: torch-free parameters of the GPU kernels (sparse24.cuh) and their launchers
// (cuda/sparse24.cu). The kernels read the canonical format (values [N, K/2], meta [N, ceil(K/8)]).
#pragma once
#include <cstdint>

#include "fastdistill/int8.h"

namespace fastdistill::sparse24 {

enum class ValKind : int { f32 = 0, bf16 = 1, f16 = 2, s8 = 3 };

struct Sparse24Params {
  const void* values = nullptr;  // [n, k/2]
  const uint8_t* meta = nullptr; // [n, ceil(k/8)]
  const float* xf = nullptr;     // float values: activations fp32 [m, k_pad] (zero padded)
  const int8_t* qx = nullptr;    // int8 values: quantised activations [m, k_pad]
  const float* x_scales = nullptr;
  const float* w_scales = nullptr;
  const float* bias = nullptr;   // [n] fp32 or null
  void* out = nullptr;           // [m, ldo] in out_kind
  int64_t m = 0, n = 0, k = 0, k_pad = 0, ldo = 0;
  int8::OutKind out_kind = int8::OutKind::f32;
};

namespace gpu {
// vec: K % 32 == 0 and 16-byte aligned values (4-byte aligned meta): packed loads.
void gemv(ValKind vk, const Sparse24Params& p, bool vec, GpuStream s);
void decompress(ValKind vk, const void* values, const uint8_t* meta, int64_t n, int64_t k, void* dense, int max_blocks,
                GpuStream s);
}  // namespace gpu

}  // namespace fastdistill::sparse24

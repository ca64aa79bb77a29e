// Parameters of the 2:4 GPU kernels (sparse24.cuh): torch-free and CUDA-free, shared with the glue.
#pragma once
#include <cstdint>

#include "fastdistill/int8_params.h"

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

}  // namespace fastdistill::sparse24

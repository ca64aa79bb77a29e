// The int8 kernels run through the SIMT emulator, as the backend that cuda/int8_glue.h drives.
// The 2:4 emulator ops reuse it for their int8 values.
#pragma once
#include "fastdistill/int8.cuh"

namespace fastdistill {

struct Int8SimtBackend {
  bool int_mm = true;  // M > 16 through torch._int_mm (CPU here) + the emulated epilogue kernel
  void quantize(DType t, const int8::QuantParams& p) { int8::quantize_rows_launch(t, p, nullptr); }
  void gemv(const int8::GemvParams& p, bool weight_only) { int8::int8_gemv_launch(p, weight_only, nullptr); }
  void to_f32(DType t, const void* x, int64_t rows, int64_t ldx, int64_t k, int64_t kp, float* out) {
    int8::to_f32_padded_launch(t, x, rows, ldx, k, kp, out, nullptr);
  }
  void epilogue(const int32_t* acc, int64_t m, int64_t n, const float* xs, const float* ws, const float* bias,
                void* out, int8::OutKind kind) {
    int8::int8_epilogue_launch(acc, m, n, xs, ws, bias, out, kind, 16, nullptr);
  }
};

}  // namespace fastdistill

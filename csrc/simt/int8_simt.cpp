// The int8 CUDA kernels (fastdistill/int8.cuh) on CPU tensors through the SIMT emulator, with the same
// glue as the CUDA ops (cuda/int8_glue.h). Test-only: torch.ops.fastdistill_simt.int8_*.
#include <torch/library.h>

#include "cuda/int8_glue.h"
#include "fastdistill/int8.cuh"

namespace {

using namespace fastdistill;

struct SimtBackend {
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

SimtBackend backend(bool int_mm) {
  SimtBackend b;
  b.int_mm = int_mm;
  return b;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  auto b = backend(true);
  return int8glue::quantize_per_token(b, x);
}
std::tuple<at::Tensor, at::Tensor> quantize_per_channel(const at::Tensor& w) {
  auto b = backend(true);
  return int8glue::quantize_per_channel(b, w);
}
at::Tensor pack_weight(const at::Tensor& w) { return int8glue::pack_weight(w); }
at::Tensor unpack_weight(const at::Tensor& w, int64_t n, int64_t k) { return int8glue::unpack_weight(w, n, k); }
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& bias,
                  bool int_mm) {
  auto b = backend(int_mm);
  return int8glue::linear(b, x, w, s, bias, false);
}
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                              const std::optional<at::Tensor>& bias, bool int_mm) {
  auto b = backend(int_mm);
  return int8glue::linear(b, x, w, s, bias, true);
}
at::Tensor gemm_s32(const at::Tensor& x, const at::Tensor& w, bool int_mm) {
  auto b = backend(int_mm);
  return int8glue::gemm_s32(b, x, w);
}

}  // namespace

// Same schemas as fastdistill::* (issue 3) plus `int_mm`: false forces the GEMV kernel for every M.
TORCH_LIBRARY_FRAGMENT(fastdistill_simt, m) {
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_per_channel(Tensor w) -> (Tensor, Tensor)");
  m.def("int8_pack_weight(Tensor w_int8) -> Tensor");
  m.def("int8_unpack_weight(Tensor w_packed, int N, int K) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias, bool int_mm=True) -> Tensor");
  m.def("int8_weight_only_linear(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias, bool int_mm=True) -> Tensor");
  m.def("int8_gemm_s32(Tensor x_int8, Tensor w_int8, bool int_mm=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CPU, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("quantize_per_channel", &quantize_per_channel);
  m.impl("int8_pack_weight", &pack_weight);
  m.impl("int8_unpack_weight", &unpack_weight);
  m.impl("int8_linear", &linear);
  m.impl("int8_weight_only_linear", &weight_only_linear);
  m.impl("int8_gemm_s32", &gemm_s32);
}

// The 2:4 CUDA kernels (fastdistill/sparse24.cuh) on CPU tensors through the SIMT emulator, with the same
// glue as the CUDA ops (cuda/sparse24_glue.h). Test-only: torch.ops.fastdistill_simt.sparse24_*.
#include <torch/library.h>

#include "cuda/sparse24_glue.h"
#include "fastdistill/sparse24.cuh"

namespace {

using namespace fastdistill;

struct SimtBackend {
  bool dense_fallback = true;
  bool int_mm = true;
  void gemv(sparse24::ValKind vk, const sparse24::Sparse24Params& p, bool vec) {
    sparse24::sparse24_gemv_launch(vk, p, vec, nullptr);
  }
  void decompress(sparse24::ValKind vk, const void* v, const uint8_t* m, int64_t n, int64_t k, void* dense) {
    sparse24::sparse24_decompress_launch(vk, v, m, n, k, dense, 16, nullptr);
  }
  void quantize(DType t, const int8::QuantParams& p) { int8::quantize_rows_launch(t, p, nullptr); }
  void to_f32(DType t, const void* x, int64_t rows, int64_t ldx, int64_t k, int64_t kp, float* out) {
    int8::to_f32_padded_launch(t, x, rows, ldx, k, kp, out, nullptr);
  }
  void gemv(const int8::GemvParams& p, bool weight_only) { int8::int8_gemv_launch(p, weight_only, nullptr); }
  void epilogue(const int32_t* acc, int64_t m, int64_t n, const float* xs, const float* ws, const float* bias,
                void* out, int8::OutKind kind) {
    int8::int8_epilogue_launch(acc, m, n, xs, ws, bias, out, kind, 16, nullptr);
  }
};

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias, bool dense_fallback) {
  SimtBackend b;
  b.dense_fallback = dense_fallback;
  return sparse24glue::linear(b, x, values, meta, std::nullopt, bias, false);
}
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                       const at::Tensor& w_scales, const std::optional<at::Tensor>& bias, bool dense_fallback) {
  SimtBackend b;
  b.dense_fallback = dense_fallback;
  return sparse24glue::linear(b, x, values, meta, w_scales, bias, true);
}
std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& v, const at::Tensor& m) { return sparse24glue::pack(v, m); }
at::Tensor decompress(const at::Tensor& values, const at::Tensor& meta) {
  const at::Tensor v = values.contiguous(), m = meta.contiguous();
  const int64_t n = v.size(0), k = 2 * v.size(1);
  at::Tensor dense = at::empty({n, k}, v.options());
  SimtBackend b;
  b.decompress(sparse24glue::val_kind(v), v.data_ptr(), m.data_ptr<uint8_t>(), n, k, dense.data_ptr());
  return dense;
}

}  // namespace

// Same schemas as fastdistill::sparse24_* (issue 4) plus `dense_fallback`: false forces the GEMV for every M.
TORCH_LIBRARY_FRAGMENT(fastdistill_simt, m) {
  m.def("sparse24_pack(Tensor values, Tensor meta) -> (Tensor, Tensor)");
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias, bool dense_fallback=True) -> Tensor");
  m.def("sparse24_int8_linear(Tensor x, Tensor values, Tensor meta, Tensor w_scales, Tensor? bias, "
        "bool dense_fallback=True) -> Tensor");
  m.def("sparse24_decompress(Tensor values, Tensor meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CPU, m) {
  m.impl("sparse24_pack", &pack);
  m.impl("sparse24_linear", &linear);
  m.impl("sparse24_int8_linear", &int8_linear);
  m.impl("sparse24_decompress", &decompress);
}

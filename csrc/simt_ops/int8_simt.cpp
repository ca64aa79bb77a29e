// The int8 GPU kernels on CPU tensors through the SIMT emulator (test-only ops torch.ops.fastdistill_simt.int8_*):
// the CUDA ops' glue (glue/int8.h). `int_mm=False` runs our GEMV tiles at every M instead of the vendor GEMM.
#include <torch/library.h>

#include "glue/int8.h"

namespace fastdistill::int8 {
namespace {

GpuBackend emulator(bool vendor_gemm = true) {
  GpuBackend b;
  b.vendor_gemm = vendor_gemm;
  b.max_blocks = 16;
  return b;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) { return quantize_per_token_gpu(emulator(), x); }
std::tuple<at::Tensor, at::Tensor> quantize_per_channel(const at::Tensor& w) {
  return quantize_per_channel_gpu(emulator(), w);
}
at::Tensor pack_weight(const at::Tensor& w) { return pack_weight_gpu(w); }
at::Tensor unpack_weight(const at::Tensor& w, int64_t n, int64_t k) { return unpack_weight_gpu(w, n, k); }
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& bias,
                  c10::string_view activation, std::optional<at::ScalarType> out_dtype, bool int_mm) {
  return linear_gpu(emulator(int_mm), x, w, s, bias, false, parse_activation("int8_linear", activation), out_dtype);
}
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                              const std::optional<at::Tensor>& bias, bool int_mm) {
  return linear_gpu(emulator(int_mm), x, w, s, bias, true);
}
at::Tensor gemm_s32(const at::Tensor& x, const at::Tensor& w, bool int_mm) { return gemm_s32_gpu(emulator(int_mm), x, w); }

}  // namespace
}  // namespace fastdistill::int8

// The schemas of fastdistill::* plus `int_mm`.
TORCH_LIBRARY_FRAGMENT(fastdistill_simt, m) {
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_per_channel(Tensor w) -> (Tensor, Tensor)");
  m.def("int8_pack_weight(Tensor w_int8) -> Tensor");
  m.def("int8_unpack_weight(Tensor w_packed, int N, int K) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias, str activation=\"none\", "
        "ScalarType? out_dtype=None, bool int_mm=True) -> Tensor");
  m.def("int8_weight_only_linear(Tensor x, Tensor w_packed, Tensor w_scales, Tensor? bias, bool int_mm=True) -> Tensor");
  m.def("int8_gemm_s32(Tensor x_int8, Tensor w_int8, bool int_mm=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CPU, m) {
  using namespace fastdistill::int8;
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("quantize_per_channel", &quantize_per_channel);
  m.impl("int8_pack_weight", &pack_weight);
  m.impl("int8_unpack_weight", &unpack_weight);
  m.impl("int8_linear", &linear);
  m.impl("int8_weight_only_linear", &weight_only_linear);
  m.impl("int8_gemm_s32", &gemm_s32);
}

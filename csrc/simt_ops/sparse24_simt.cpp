// The 2:4 GPU kernels on CPU tensors through the SIMT emulator (test-only ops
// torch.ops.fastdistill_simt.sparse24_*): the CUDA ops' glue (glue/sparse24.h). `dense_fallback=False` runs
// our GEMV tiles at every M instead of decompress + vendor GEMM.
#include <torch/library.h>

#include "glue/sparse24.h"

namespace fastdistill::sparse24 {
namespace {

GpuBackend emulator(bool vendor_gemm) {
  GpuBackend b;
  b.vendor_gemm = vendor_gemm;
  b.max_blocks = 16;
  return b;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias, bool dense_fallback) {
  return linear_gpu(emulator(dense_fallback), x, values, meta, std::nullopt, bias);
}
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                       const at::Tensor& w_scales, const std::optional<at::Tensor>& bias, bool dense_fallback) {
  return linear_gpu(emulator(dense_fallback), x, values, meta, w_scales, bias);
}
at::Tensor decompress(const at::Tensor& values, const at::Tensor& meta) {
  const at::Tensor v = values.contiguous(), m = meta.contiguous();
  const int64_t n = v.size(0), k = 2 * v.size(1);
  at::Tensor dense = at::empty({n, k}, v.options());
  gpu::decompress(val_kind(v), v.data_ptr(), m.data_ptr<uint8_t>(), n, k, dense.data_ptr(), 16, nullptr);
  return dense;
}

}  // namespace
}  // namespace fastdistill::sparse24

// The schemas of fastdistill::sparse24_* plus `dense_fallback`, and the decompression kernel alone.
TORCH_LIBRARY_FRAGMENT(fastdistill_simt, m) {
  m.def("sparse24_pack(Tensor values, Tensor meta) -> (Tensor, Tensor)");
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias, bool dense_fallback=True) -> Tensor");
  m.def("sparse24_int8_linear(Tensor x, Tensor values, Tensor meta, Tensor w_scales, Tensor? bias, "
        "bool dense_fallback=True) -> Tensor");
  m.def("sparse24_decompress(Tensor values, Tensor meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CPU, m) {
  using namespace fastdistill::sparse24;
  m.impl("sparse24_pack", &pack);
  m.impl("sparse24_linear", &linear);
  m.impl("sparse24_int8_linear", &int8_linear);
  m.impl("sparse24_decompress", &decompress);
}

// Launchers of the int8 GPU kernels (fastdistill/int8.cuh): grid shapes, tile heights and the dtype
// dispatch. nvcc builds this file for CUDA; simt_ops/launchers_simt.cpp compiles it for the CPU SIMT emulator.
#include "fastdistill/int8.cuh"

namespace fastdistill::int8 {
namespace {

template <class F>
void dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::f32: f.template operator()<float>(); break;
    case DType::bf16: f.template operator()<bf16_t>(); break;
    case DType::f16: f.template operator()<f16_t>(); break;
  }
}

}  // namespace

void gpu::quantize_rows(const QuantParams& p, GpuStream s) {
  if (p.rows == 0) return;
  int threads = 32;
  while (threads < 256 && threads < p.k_pad) threads *= 2;
  dispatch_float(p.dtype, [&]<class T>() {
    simt::launch(&quantize_rows_kernel<T>, dim3(unsigned(p.rows)), dim3(threads), 0, static_cast<simt::stream_t>(s), p);
  });
}

void gpu::gemv(const GemvParams& p, bool weight_only, GpuStream s) {
  if (p.m == 0 || p.n == 0) return;
  const auto stream = static_cast<simt::stream_t>(s);
  const int mt = gemv_tile_rows(p.m);
  const dim3 grid(unsigned((p.n + kGemvWarps - 1) / kGemvWarps), unsigned((p.m + mt - 1) / mt));
  const dim3 block(32 * kGemvWarps);
  auto go = [&]<int MT>() {
    if (weight_only) simt::launch(&int8_wo_gemv_kernel<MT>, grid, block, 0, stream, p);
    else simt::launch(&int8_gemv_kernel<MT>, grid, block, 0, stream, p);
  };
  switch (mt) {
    case 1: go.template operator()<1>(); break;
    case 2: go.template operator()<2>(); break;
    case 4: go.template operator()<4>(); break;
    case 8: go.template operator()<8>(); break;
    default: go.template operator()<16>(); break;
  }
}

void gpu::to_f32_padded(DType t, const void* x, int64_t rows, int64_t ldx, int64_t k, int64_t k_pad, float* out,
                        GpuStream s) {
  if (rows == 0) return;
  dispatch_float(t, [&]<class T>() {
    simt::launch(&to_f32_padded_kernel<T>, dim3(unsigned(rows)), dim3(128), 0, static_cast<simt::stream_t>(s), x, ldx,
                 k, k_pad, out);
  });
}

void gpu::dequant_epilogue(const int32_t* acc, int64_t m, int64_t n, const float* x_scales, const float* w_scales,
                           const float* bias, Activation act, void* out, OutKind kind, int max_blocks, GpuStream s) {
  const int64_t total = m * n;
  if (total == 0) return;
  int64_t blocks = (total + 255) / 256;
  if (blocks > max_blocks) blocks = max_blocks;
  simt::launch(&int8_dequant_epilogue_kernel<int32_t>, dim3(unsigned(blocks)), dim3(256), 0,
               static_cast<simt::stream_t>(s), acc, m, n, x_scales, w_scales, bias, act, out, kind);
}

}  // namespace fastdistill::int8

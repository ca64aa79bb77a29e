// Launchers of the 2:4 GPU kernels (fastdistill/sparse24.cuh): tile heights, grid shapes and the value-type
// dispatch. nvcc builds this file for CUDA; simt_ops/launchers_simt.cpp compiles it for the CPU SIMT emulator.
#include "fastdistill/sparse24.cuh"

namespace fastdistill::sparse24 {
namespace {

template <class F>
void dispatch_values(ValKind t, F&& f) {
  switch (t) {
    case ValKind::f32: f.template operator()<float>(); break;
    case ValKind::bf16: f.template operator()<bf16_t>(); break;
    case ValKind::f16: f.template operator()<f16_t>(); break;
    case ValKind::s8: f.template operator()<int8_t>(); break;
  }
}

}  // namespace

void gpu::gemv(ValKind vk, const Sparse24Params& p, bool vec, GpuStream s) {
  if (p.m == 0 || p.n == 0) return;
  const auto stream = static_cast<simt::stream_t>(s);
  const int mt = int8::gemv_tile_rows(p.m);
  const dim3 grid(unsigned((p.n + kWarps - 1) / kWarps), unsigned((p.m + mt - 1) / mt));
  dispatch_values(vk, [&]<class V>() {
    auto go = [&]<int MT>() {
      if (vec) simt::launch(&sparse24_gemv_kernel<V, MT, true>, grid, dim3(32 * kWarps), 0, stream, p);
      else simt::launch(&sparse24_gemv_kernel<V, MT, false>, grid, dim3(32 * kWarps), 0, stream, p);
    };
    switch (mt) {
      case 1: go.template operator()<1>(); break;
      case 2: go.template operator()<2>(); break;
      case 4: go.template operator()<4>(); break;
      case 8: go.template operator()<8>(); break;
      default: go.template operator()<16>(); break;
    }
  });
}

void gpu::decompress(ValKind vk, const void* values, const uint8_t* meta, int64_t n, int64_t k, void* dense,
                     int max_blocks, GpuStream s) {
  const int64_t groups = n * (k / 4);
  if (groups == 0) return;
  int64_t blocks = (groups + 255) / 256;
  if (blocks > max_blocks) blocks = max_blocks;
  dispatch_values(vk, [&]<class V>() {
    simt::launch(&sparse24_decompress_kernel<V>, dim3(unsigned(blocks)), dim3(256), 0, static_cast<simt::stream_t>(s),
                 static_cast<const V*>(values), meta, n, k, static_cast<V*>(dense));
  });
}

}  // namespace fastdistill::sparse24

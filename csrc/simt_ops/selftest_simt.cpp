// Emulator self-tests: small kernels that exercise each simt.h primitive, and deliberately broken
// kernels (a missing __syncthreads / __syncwarp) that must give wrong results under the emulator.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "fastdistill/simt.h"

namespace {

using namespace fastdistill;

// out[i] = x[(i + 1) % n] passed through shared memory; without the barrier a thread reads its
// neighbour's slot before the neighbour has written it (whatever order the threads run in, since the
// dependencies form a cycle), so it sees the poison or a stale value.
FD_KERNEL void rotate_kernel(const float* x, float* out, bool sync) {
  FD_DYNAMIC_SMEM(float, buf);
  const int n = int(blockDim.x), i = int(threadIdx.x), b = int(blockIdx.x);
  buf[i] = x[b * n + i];
  if (sync) __syncthreads();
  out[b * n + i] = buf[(i + 1) % n];
}

// Per-warp tree sum through shared memory: the classic "warp-synchronous" code that is wrong since
// Volta unless each step has a __syncwarp.
FD_KERNEL void warp_sum_smem_kernel(const float* x, float* out, bool sync) {
  FD_SHARED(float, buf, 1024);
  const int i = int(threadIdx.x), lane = i & 31, base = int(blockIdx.x) * int(blockDim.x);
  buf[i] = x[base + i];
  if (sync) __syncwarp();
  for (int o = 16; o > 0; o >>= 1) {
    float v = lane < o ? buf[i] + buf[i + o] : 0.f;
    if (sync) __syncwarp();
    if (lane < o) buf[i] = v;
    if (sync) __syncwarp();
  }
  if (lane == 0) out[(base + i) / 32] = buf[i];
}

// Every primitive once: out[t] = [shfl idx from lane 3, shfl_xor 1, shfl_down 2, shfl_up 1,
// ballot(x odd), any(x > 100), all(x >= 0), warp_sum, dp4a(x, x+1, 7), atomicAdd/atomicMax results].
FD_KERNEL void primitives_kernel(const int* x, int* out, int* counters) {
  const int i = int(threadIdx.x) + int(blockIdx.x) * int(blockDim.x);
  const int v = x[i];
  int* o = out + i * 10;
  o[0] = __shfl_sync(0xffffffffu, v, 3);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 1);
  o[2] = __shfl_down_sync(0xffffffffu, v, 2);
  o[3] = __shfl_up_sync(0xffffffffu, v, 1);
  o[4] = int(__ballot_sync(0xffffffffu, v & 1));
  o[5] = __any_sync(0xffffffffu, v > 100);
  o[6] = __all_sync(0xffffffffu, v >= 0);
  o[7] = int(simt::warp_sum(float(v)));
  o[8] = __dp4a(v, v + 1, 7);
  atomicAdd(&counters[0], v);
  atomicMax(&counters[1], v);
  o[9] = 0;
}

// A __syncthreads that only some threads reach: the emulator must refuse it.
FD_KERNEL void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

FD_KERNEL void misaligned_kernel(const float* x, float* out) {
  const auto p = simt::load_pack<float, 4>(x + 1);
  out[threadIdx.x] = p.v[0];
}

at::Tensor rotate(const at::Tensor& x, bool sync) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) <= 1024, "rotate: float [blocks, <=1024]");
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  simt::launch(&rotate_kernel, dim3(unsigned(x.size(0))), dim3(unsigned(x.size(1))), size_t(x.size(1)) * 4, nullptr,
               xc.data_ptr<float>(), out.data_ptr<float>(), sync);
  return out;
}

at::Tensor warp_sum_smem(const at::Tensor& x, bool sync) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % 32 == 0 && x.size(1) <= 1024,
              "warp_sum_smem: float [blocks, 32k]");
  auto xc = x.contiguous();
  auto out = at::empty({x.size(0), x.size(1) / 32}, x.options());
  simt::launch(&warp_sum_smem_kernel, dim3(unsigned(x.size(0))), dim3(unsigned(x.size(1))), 0, nullptr,
               xc.data_ptr<float>(), out.data_ptr<float>(), sync);
  return out;
}

std::tuple<at::Tensor, at::Tensor> primitives(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kInt && x.size(0) % 32 == 0, "primitives: int32 [32k]");
  auto xc = x.contiguous();
  auto out = at::zeros({x.size(0), 10}, x.options());
  auto counters = at::tensor({0, INT32_MIN}, x.options());
  const unsigned threads = unsigned(std::min<int64_t>(x.size(0), 128));
  simt::launch(&primitives_kernel, dim3(unsigned(x.size(0)) / threads), dim3(threads), 0, nullptr,
               xc.data_ptr<int>(), out.data_ptr<int>(), counters.data_ptr<int>());
  return {out, counters};
}

void divergent_barrier() {
  auto out = at::zeros({64});
  simt::launch(&divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr, out.data_ptr<float>());
}

void misaligned_load() {
  auto x = at::zeros({64});
  auto out = at::zeros({32});
  simt::launch(&misaligned_kernel, dim3(1), dim3(32), 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill_simt, m) {
  m.def("selftest_rotate(Tensor x, bool sync) -> Tensor");
  m.def("selftest_warp_sum_smem(Tensor x, bool sync) -> Tensor");
  m.def("selftest_primitives(Tensor x) -> (Tensor, Tensor)");
  m.def("selftest_divergent_barrier() -> ()");
  m.def("selftest_misaligned_load() -> ()");
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CPU, m) {
  m.impl("selftest_rotate", &rotate);
  m.impl("selftest_warp_sum_smem", &warp_sum_smem);
  m.impl("selftest_primitives", &primitives);
}

TORCH_LIBRARY_IMPL(fastdistill_simt, CatchAll, m) {
  m.impl("selftest_divergent_barrier", &divergent_barrier);
  m.impl("selftest_misaligned_load", &misaligned_load);
}

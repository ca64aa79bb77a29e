// Launchers of the distillation-loss GPU kernels (fastdistill/kd_loss.cuh): the dtype dispatch and the
// launch sequence (forward, split merge, the JSD second pass). nvcc builds this file for CUDA;
// simt_ops/launchers_simt.cpp compiles the same file for the CPU SIMT emulator.
#include "fastdistill/kd_loss.cuh"

namespace fastdistill::kd {
namespace {

// Calls f.template operator()<Ts, Tt>() for the runtime dtypes (all nine combinations).
template <class F>
void dispatch(DType s, DType t, F&& f) {
  auto with_t = [&](auto sv) {
    using S = decltype(sv);
    switch (t) {
      case DType::f32: f.template operator()<S, float>(); break;
      case DType::bf16: f.template operator()<S, bf16_t>(); break;
      case DType::f16: f.template operator()<S, f16_t>(); break;
    }
  };
  switch (s) {
    case DType::f32: with_t(float{}); break;
    case DType::bf16: with_t(bf16_t{}); break;
    case DType::f16: with_t(f16_t{}); break;
  }
}

}  // namespace

void gpu::forward(const KdLossParams& p, float* row_loss, float* stats, float* ws, KdLaunchConfig c, GpuStream s) {
  if (p.rows == 0) return;
  const auto stream = static_cast<simt::stream_t>(s);
  dispatch(p.student_dtype, p.teacher_dtype, [&]<class Ts, class Tt>() {
    const unsigned blocks = unsigned(p.rows * c.splits);
    simt::launch(&kd_forward_kernel<Ts, Tt>, dim3(blocks), dim3(c.threads), 0, stream, p, row_loss, stats,
                 reinterpret_cast<KdPartial*>(ws), c.splits);
    const unsigned merge_blocks = unsigned((p.rows + 127) / 128);
    if (c.splits > 1)
      simt::launch(&kd_forward_merge_kernel<Ts>, dim3(merge_blocks), dim3(128), 0, stream, p, row_loss, stats,
                   static_cast<const KdPartial*>(reinterpret_cast<KdPartial*>(ws)), c.splits);
    if (p.divergence == Divergence::jsd) {
      simt::launch(&kd_jsd_kernel<Ts, Tt>, dim3(blocks), dim3(c.threads), 0, stream, p, row_loss, stats, ws, c.splits);
      if (c.splits > 1)
        simt::launch(&kd_jsd_merge_kernel<Ts>, dim3(merge_blocks), dim3(128), 0, stream, p, row_loss, stats,
                     static_cast<const float*>(ws), c.splits);
    }
  });
}

void gpu::backward(const KdLossParams& p, const float* grad_rows, const float* stats, void* grad, KdLaunchConfig c,
                   GpuStream s) {
  if (p.rows == 0) return;
  dispatch(p.student_dtype, p.teacher_dtype, [&]<class Ts, class Tt>() {
    simt::launch(&kd_backward_kernel<Ts, Tt>, dim3(unsigned(p.rows * c.splits)), dim3(c.threads), 0,
                 static_cast<simt::stream_t>(s), p, grad_rows, stats, static_cast<Ts*>(grad), c.splits);
  });
}

// ---- vocab-parallel shards ----
void gpu::partial(const KdLossParams& p, float* out, float* ws, KdLaunchConfig c, GpuStream s) {
  if (p.rows == 0) return;
  const auto stream = static_cast<simt::stream_t>(s);
  dispatch(p.student_dtype, p.teacher_dtype, [&]<class Ts, class Tt>() {
    KdPartial* states = reinterpret_cast<KdPartial*>(ws);
    simt::launch(&kd_partial_kernel<Ts, Tt>, dim3(unsigned(p.rows * c.splits)), dim3(c.threads), 0, stream, p, out,
                 states, c.splits);
    if (c.splits > 1)
      simt::launch(&kd_partial_merge_kernel<Ts>, dim3(unsigned((p.rows + 127) / 128)), dim3(128), 0, stream, p, out,
                   static_cast<const KdPartial*>(states), c.splits);
  });
}

void gpu::jsd_sums(const KdLossParams& p, const float* stats, float* out, float* ws, KdLaunchConfig c, GpuStream s) {
  if (p.rows == 0) return;
  const auto stream = static_cast<simt::stream_t>(s);
  dispatch(p.student_dtype, p.teacher_dtype, [&]<class Ts, class Tt>() {
    simt::launch(&kd_jsd_sums_kernel<Ts, Tt>, dim3(unsigned(p.rows * c.splits)), dim3(c.threads), 0, stream, p,
                 stats, out, ws, c.splits);
    if (c.splits > 1)
      simt::launch(&kd_jsd_sums_merge_kernel<Ts>, dim3(unsigned((p.rows + 127) / 128)), dim3(128), 0, stream, p,
                   out, static_cast<const float*>(ws), c.splits);
  });
}

}  // namespace fastdistill::kd

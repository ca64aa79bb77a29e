// Launchers of the top-k teacher loss's GPU kernels (fastdistill/kd_topk.cuh): the student-dtype dispatch. nvcc
// builds this file for CUDA; simt_ops/launchers_simt.cpp compiles the same file for the CPU SIMT emulator.
#include "fastdistill/kd_topk.cuh"

namespace fastdistill::kd {
namespace {

template <class F>
void with_student_dtype(DType s, F&& f) {
  switch (s) {
    case DType::f32: f.template operator()<float>(); break;
    case DType::bf16: f.template operator()<bf16_t>(); break;
    case DType::f16: f.template operator()<f16_t>(); break;
  }
}

}  // namespace

void gpu::topk_forward(const KdTopkParams& p, float* row_loss, float* stats, int threads, GpuStream s) {
  if (p.kd.rows == 0) return;
  with_student_dtype(p.kd.student_dtype, [&]<class Ts>() {
    simt::launch(&kd_topk_forward_kernel<Ts>, dim3(unsigned(p.kd.rows)), dim3(threads), 0,
                 static_cast<simt::stream_t>(s), p, row_loss, stats);
  });
}

void gpu::topk_backward(const KdTopkParams& p, const float* grad_rows, const float* stats, void* grad, int threads,
                        GpuStream s) {
  if (p.kd.rows == 0) return;
  with_student_dtype(p.kd.student_dtype, [&]<class Ts>() {
    simt::launch(&kd_topk_backward_kernel<Ts>, dim3(unsigned(p.kd.rows)), dim3(threads), 0,
                 static_cast<simt::stream_t>(s), p, grad_rows, stats, static_cast<Ts*>(grad));
  });
}

}  // namespace fastdistill::kd

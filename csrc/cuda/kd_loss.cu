// Fused distillation loss on CUDA: instantiates the kernels of fastdistill/kd_loss.cuh for the nine
// (student, teacher) dtype pairs. Torch-free; the torch glue is kd_loss_cuda.cpp.
#include "fastdistill/kd_loss.cuh"
#include "cuda/kd_loss_launch.h"

namespace fastdistill::kd {

void kd_forward_cuda(const KdLossParams& p, float* row_loss, float* stats, float* ws, KdLaunchConfig c,
                     cudaStream_t stream) {
  kd_dispatch(p.student_dtype, p.teacher_dtype,
              [&]<class Ts, class Tt>() { kd_forward_launch<Ts, Tt>(p, row_loss, stats, ws, c, stream); });
}

void kd_backward_cuda(const KdLossParams& p, const float* grad_rows, const float* stats, void* grad,
                      KdLaunchConfig c, cudaStream_t stream) {
  kd_dispatch(p.student_dtype, p.teacher_dtype,
              [&]<class Ts, class Tt>() { kd_backward_launch<Ts, Tt>(p, grad_rows, stats, grad, c, stream); });
}

}  // namespace fastdistill::kd

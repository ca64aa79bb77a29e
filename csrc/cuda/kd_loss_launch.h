// Host entry points of the CUDA kd_loss kernels (kd_loss.cu), callable from the torch glue without the
// device headers.
#pragma once
#include <cuda_runtime_api.h>

#include "fastdistill/kd_loss_launch.h"

namespace fastdistill::kd {

void kd_forward_cuda(const KdLossParams& p, float* row_loss, float* stats, float* ws, KdLaunchConfig c,
                     cudaStream_t stream);
void kd_backward_cuda(const KdLossParams& p, const float* grad_rows, const float* stats, void* grad,
                      KdLaunchConfig c, cudaStream_t stream);

}  // namespace fastdistill::kd

// Torch-side pieces of the kd_loss GPU ops that the CPU glue does not have (argument checking and
// parameter packing are csrc/kd_loss_args.h, shared with the CPU ops). Used by the CUDA impls in
// kd_loss_cuda.cpp and by the emulator test ops in csrc/simt/kd_loss_simt.cpp.
#pragma once
#include <ATen/ATen.h>

#include "kd_loss_args.h"

namespace fastdistill::glue {

// Same checks and messages as the CPU kd_loss_backward.
inline void kd_check_backward(const at::Tensor& grad_rows, const at::Tensor& stats, const KdLossParams& p,
                              const at::Device& dev) {
  TORCH_CHECK(grad_rows.scalar_type() == at::kFloat && grad_rows.numel() == p.rows,
              "fastdistill.kd_loss_backward: grad_rows must be float32 with ", p.rows, " elements, got ",
              grad_rows.scalar_type(), " ", grad_rows.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.sizes() == at::IntArrayRef({p.rows, kNumStats}),
              "fastdistill.kd_loss_backward: stats must be float32 [", p.rows, ", ", int(kNumStats), "], got ",
              stats.scalar_type(), " ", stats.sizes());
  TORCH_CHECK(grad_rows.device() == dev && stats.device() == dev,
              "fastdistill.kd_loss_backward: grad_rows and stats must be on the logits' device ", dev, ", got ",
              grad_rows.device(), " and ", stats.device());
}

}  // namespace fastdistill::glue

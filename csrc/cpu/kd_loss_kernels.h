// Per-ISA entry points of the fused distillation loss (defined by kd_loss_{avx512,avx2,scalar}.cpp).
#pragma once
#include "fastdistill/kd_loss.h"

#define FASTDISTILL_DECLARE_KD_LOSS(isa)                                                                  \
  namespace fastdistill::cpu::isa {                                                                       \
  KdPartial kd_row_stats(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1);                     \
  void kd_row_jsd(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, const KdRowGrad& lse,      \
                  float* sum_p, float* sum_q);                                                            \
  void kd_row_backward(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, const KdRowGrad& r,    \
                       void* grad);                                                                       \
  }

FASTDISTILL_DECLARE_KD_LOSS(scalar)
#if defined(__x86_64__)
FASTDISTILL_DECLARE_KD_LOSS(avx2)
FASTDISTILL_DECLARE_KD_LOSS(avx512)
#endif

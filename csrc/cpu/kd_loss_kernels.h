// Per-ISA entry points of the fused distillation loss (defined by kd_loss_{avx512,avx2,scalar}.cpp).
#pragma once
#include "fastdistill/kd_loss.h"

namespace fastdistill::cpu {
// Columns per block of the kernels' two-level (block max, then sums) row pass.
constexpr int64_t kKdBlock = 2048;
// Floats of kd_row_stats_cached's cache for a row of `vocab` columns (also enough for kd_row_jsd's).
inline int64_t kd_cache_floats(int64_t vocab) { return 2 * vocab + 2 * ((vocab + kKdBlock - 1) / kKdBlock); }
}  // namespace fastdistill::cpu

#define FASTDISTILL_DECLARE_KD_LOSS(isa)                                                                  \
  namespace fastdistill::cpu::isa {                                                                       \
  KdPartial kd_row_stats(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1);                     \
  /* cache: null, or (fused training, whole rows) 2 * vocab floats for kd_row_backward_cached */         \
  void kd_row_jsd(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, const KdRowGrad& lse,      \
                  float* sum_p, float* sum_q, float* cache);                                              \
  void kd_row_backward(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, const KdRowGrad& r,    \
                       void* grad);                                                                       \
  /* Fused training path without a separate hard softmax, whole rows: forward / reverse KL cache in     \
     kd_row_stats_cached, JSD in kd_row_jsd; kd_row_backward_cached reads either. */                      \
  KdPartial kd_row_stats_cached(const KdLossParams& p, int64_t row, float* cache, void* grad);          \
  void kd_row_backward_cached(const KdLossParams& p, int64_t row, const KdRowGrad& r, const float* cache, \
                              void* grad);                                                                \
  }

FASTDISTILL_DECLARE_KD_LOSS(scalar)
#if defined(__x86_64__)
FASTDISTILL_DECLARE_KD_LOSS(avx2)
FASTDISTILL_DECLARE_KD_LOSS(avx512)
#endif

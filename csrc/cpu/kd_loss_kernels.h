// The distillation loss's CPU kernel table: one per ISA level (kd_loss_{scalar,avx2,avx512,avx512bf16}.cpp, each compiling
// the kernels of kd_loss_per_isa.inc for its level), chosen by kd_kernels().
#pragma once
#include "cpu/cpu_isa.h"
#include "fastdistill/kd_loss.h"

namespace fastdistill::cpu::kd {

// Columns per block of the kernels' two-level (block max, then sums) row pass.
constexpr int64_t kKdBlock = 2048;
// Floats of stats_cached's cache for a row of `vocab` columns (also enough for jsd's).
inline int64_t kd_cache_floats(int64_t vocab) { return 2 * vocab + 2 * ((vocab + kKdBlock - 1) / kKdBlock); }

struct KdKernels {
  // The online-softmax state of row `row`, columns [c0, c1).
  KdPartial (*stats)(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1);
  // JSD second pass over [c0, c1): sum p (log p - log M) and q (log q - log M). cache: null, or (fused training,
  // whole rows) 2 * vocab floats for backward_cached.
  void (*jsd)(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, const KdRowGrad& lse, float* sum_p,
              float* sum_q, float* cache);
  // Gradient of row `row`, columns [c0, c1), into grad (contiguous [rows, vocab]).
  void (*backward)(const KdLossParams& p, int64_t row, int64_t c0, int64_t c1, const KdRowGrad& r, void* grad);
  // Fused training path without a separate hard softmax, whole rows: forward / reverse KL keep their exponentials
  // (and log ratios) in `cache` here, JSD in jsd(); backward_cached reads either. grad is prefetched for writing.
  KdPartial (*stats_cached)(const KdLossParams& p, int64_t row, float* cache, void* grad);
  void (*backward_cached)(const KdLossParams& p, int64_t row, const KdRowGrad& r, const float* cache, void* grad);
};

}  // namespace fastdistill::cpu::kd

namespace fastdistill::cpu {
namespace scalar { extern const kd::KdKernels kd_table; }
#if defined(__x86_64__)
namespace avx2 { extern const kd::KdKernels kd_table; }
namespace avx512 { extern const kd::KdKernels kd_table; }
namespace avx512bf16 { extern const kd::KdKernels kd_table; }
#endif
}  // namespace fastdistill::cpu

namespace fastdistill::cpu::kd {

inline IsaTables<KdKernels> kd_tables() {
#if defined(__x86_64__)
  return {&scalar::kd_table, &avx2::kd_table, &avx512::kd_table, &avx512bf16::kd_table};
#else
  return {&scalar::kd_table, nullptr, nullptr, nullptr};
#endif
}

inline const KdKernels& kd_kernels() { return kernels_for(kd_tables()); }

}  // namespace fastdistill::cpu::kd

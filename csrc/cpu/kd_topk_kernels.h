// The top-k teacher loss's CPU kernel table: the vocabulary-sized passes over the student row (kd_topk_per_isa.inc,
// compiled per ISA level by kd_loss_<isa>.cpp next to the kd kernels it builds on), chosen by kd_topk_kernels().
// The k-sized work per row (the used slots and the outcome algebra of fastdistill/kd_topk.h) is kd_topk_cpu.cpp's.
#pragma once
#include "cpu/cpu_isa.h"
#include "fastdistill/kd_topk.h"

namespace fastdistill::cpu::kd {

struct KdTopkKernels {
  // The student's online-softmax state (m_s, z_s, z_h of KdPartial; teacher fields unused) over the row's columns
  // outside the sorted used indices cuts[0, ncuts): the tail, summed directly.
  KdPartial (*tail_stats)(const KdTopkParams& p, int64_t row, const int64_t* cuts, int64_t ncuts);
  // Every column of row `row` as a tail column: grad_j = tail_soft * q_j + hard term (r: m_s, lz_s, lz_h, hard,
  // label). The caller then overwrites the used columns.
  void (*tail_backward)(const KdTopkParams& p, int64_t row, const KdRowGrad& r, float tail_soft, void* grad);
};

}  // namespace fastdistill::cpu::kd

namespace fastdistill::cpu {
namespace scalar { extern const kd::KdTopkKernels kd_topk_table; }
#if defined(__x86_64__)
namespace avx2 { extern const kd::KdTopkKernels kd_topk_table; }
namespace avx512 { extern const kd::KdTopkKernels kd_topk_table; }
namespace avx512bf16 { extern const kd::KdTopkKernels kd_topk_table; }
#endif
}  // namespace fastdistill::cpu

namespace fastdistill::cpu::kd {

inline const KdTopkKernels& kd_topk_kernels() {
#if defined(__x86_64__)
  return kernels_for(IsaTables<KdTopkKernels>{&scalar::kd_topk_table, &avx2::kd_topk_table, &avx512::kd_topk_table,
                                              &avx512bf16::kd_topk_table});
#else
  return kernels_for(IsaTables<KdTopkKernels>{&scalar::kd_topk_table, nullptr, nullptr, nullptr});
#endif
}

}  // namespace fastdistill::cpu::kd

// The distillation loss's CPU kernels (kd_loss_per_isa.inc), avx2 level.
#include "cpu/simd/prelude.h"
#include "cpu/kd_loss_kernels.h"
#include "cpu/kd_topk_kernels.h"
#if defined(__x86_64__)
FASTDISTILL_TARGET_AVX2
#include "cpu/simd/avx2.h"

namespace fastdistill::cpu::avx2 {
#include "cpu/kd_loss_per_isa.inc"
#include "cpu/kd_topk_per_isa.inc"
}  // namespace fastdistill::cpu::avx2
#endif

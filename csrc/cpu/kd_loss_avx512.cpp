// The distillation loss's CPU kernels (kd_loss_per_isa.inc), avx512 level.
#include "cpu/simd/prelude.h"
#include "cpu/kd_loss_kernels.h"
#include "cpu/kd_topk_kernels.h"
#if defined(__x86_64__)
FASTDISTILL_TARGET_AVX512
#include "cpu/simd/avx512.h"

namespace fastdistill::cpu::avx512 {
#include "cpu/kd_loss_per_isa.inc"
#include "cpu/kd_topk_per_isa.inc"
}  // namespace fastdistill::cpu::avx512
#endif

// The distillation loss's CPU kernels (kd_loss_per_isa.inc), avx512bf16 level: the avx512 vector interface with
// native fp32 -> bf16 conversions (one instruction per vector for bf16 gradients instead of a rounding sequence).
#include "cpu/simd/prelude.h"
#include "cpu/kd_loss_kernels.h"
#include "cpu/kd_topk_kernels.h"
#if defined(__x86_64__)
FASTDISTILL_TARGET_AVX512BF16
#define FASTDISTILL_SIMD_AVX512BF16
#include "cpu/simd/avx512.h"

namespace fastdistill::cpu::avx512bf16 {
#include "cpu/kd_loss_per_isa.inc"
#include "cpu/kd_topk_per_isa.inc"
}  // namespace fastdistill::cpu::avx512bf16
#endif

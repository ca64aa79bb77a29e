// The distillation loss's CPU kernels (kd_loss_per_isa.inc), scalar level.
#include "cpu/simd/prelude.h"
#include "cpu/kd_loss_kernels.h"
#include "cpu/kd_topk_kernels.h"
#include "cpu/simd/scalar.h"

namespace fastdistill::cpu::scalar {
#include "cpu/kd_loss_per_isa.inc"
#include "cpu/kd_topk_per_isa.inc"
}  // namespace fastdistill::cpu::scalar

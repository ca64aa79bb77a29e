// Fused distillation loss, scalar path. The kernel is written once in kd_loss_kernel.h.
#include "cpu/simd/prelude.h"
#include "cpu/kd_loss_kernels.h"


#include "cpu/simd/scalar.h"

namespace fastdistill::cpu::scalar {
#include "cpu/kd_loss_kernel.h"
}  // namespace fastdistill::cpu::scalar


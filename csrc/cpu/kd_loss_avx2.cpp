// Fused distillation loss, avx2 path. The kernel is written once in kd_loss_kernel.h.
#include "cpu/simd/prelude.h"
#include "cpu/kd_loss_kernels.h"
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#include "cpu/simd/avx2.h"

namespace fastdistill::cpu::avx2 {
#include "cpu/kd_loss_kernel.h"
}  // namespace fastdistill::cpu::avx2
#endif

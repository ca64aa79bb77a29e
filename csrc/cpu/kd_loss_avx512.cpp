// Fused distillation loss, avx512 path. The kernel is written once in kd_loss_kernel.h.
#include "cpu/simd/prelude.h"
#include "cpu/kd_loss_kernels.h"
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#include "cpu/simd/avx512.h"

namespace fastdistill::cpu::avx512 {
#include "cpu/kd_loss_kernel.h"
}  // namespace fastdistill::cpu::avx512
#endif

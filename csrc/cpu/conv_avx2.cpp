// int8 Conv2d CPU kernels, avx2 level: the shared implicit GEMM driver and epilogue (conv_per_isa.inc) and its
// portable depthwise kernel, compiled for this level (the compiler vectorises the channel loops).
#include <vector>

#include "cpu/simd/prelude.h"
#include "cpu/conv_kernels.h"

#if defined(__x86_64__)
FASTDISTILL_TARGET_AVX2

namespace fastdistill::cpu::conv::avx2 {

#include "cpu/conv_per_isa.inc"

void depthwise(const ConvParams& p, int64_t m0, int64_t m1) { depthwise_generic(p, m0, m1); }

extern const ConvKernels kernels{gemm_rows, depthwise};

}  // namespace fastdistill::cpu::conv::avx2
#endif  // __x86_64__

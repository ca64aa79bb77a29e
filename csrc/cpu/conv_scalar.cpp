// int8 Conv2d CPU kernels, scalar level: the shared implicit GEMM driver and epilogue (conv_per_isa.inc) and its
// portable depthwise kernel, compiled without SIMD target flags.
#include <vector>

#include "cpu/simd/prelude.h"
#include "cpu/conv_kernels.h"

namespace fastdistill::cpu::conv::scalar {

#include "cpu/conv_per_isa.inc"

void depthwise(const ConvParams& p, int64_t m0, int64_t m1) { depthwise_generic(p, m0, m1); }

extern const ConvKernels kernels{gemm_rows, depthwise};

}  // namespace fastdistill::cpu::conv::scalar


// Everything a per-ISA kernel file includes BEFORE its `#pragma GCC target`: keeping std and
// intrinsic headers ahead of the pragma keeps their inline functions compiled for the base ISA
// (an inline compiled for AVX-512 could otherwise be picked by the linker for every caller).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "cpu/cpu_isa.h"
#include "fastdistill/common.h"

// The `#pragma GCC target` of each ISA level (cpu_isa.h), written once so that every family's kernels of a level
// are compiled for the same instruction set.
#define FASTDISTILL_TARGET_AVX2 _Pragma("GCC target(\"avx2,fma,f16c,bmi2\")")
#define FASTDISTILL_TARGET_AVX512 \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c,bmi2\")")
#define FASTDISTILL_TARGET_AVX512BF16 \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16,avx2,fma,f16c,bmi2\")")
#define FASTDISTILL_TARGET_AMX                                                                                  \
  _Pragma(                                                                                                     \
      "GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16,avx2,fma,f16c,bmi2,amx-tile,amx-int8,amx-bf16\")")

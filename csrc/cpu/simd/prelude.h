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
#include "fastdistill/common.h"

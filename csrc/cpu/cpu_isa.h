// Runtime CPU ISA selection, and the one dispatch pattern every op family uses: a kernel table per ISA level,
// picked from the level in force. The level is chosen at first use from FASTDISTILL_CPU_ISA (auto | amx |
// avx512bf16 | avx512 | avx2 | scalar) and the CPU's features, and can be changed at run time (tests run every path
// in one process). FASTDISTILL_CPU_HIDE=feature,... makes the detection ignore features (tests of CPUs that lack them).
//
// Levels, each a superset of the one below:
//   scalar      portable C++
//   avx2        AVX2 + FMA + F16C + BMI2
//   avx512      AVX-512 F/BW/VL/DQ + VNNI + VBMI (Ice Lake, Zen 4 and later: the int8 and 2:4 kernels need the
//               last two, so a CPU without them runs avx2 and says so)
//   avx512bf16  avx512 + AVX512_BF16 (native bf16 conversions and dot products: Zen 4, Sapphire Rapids)
//   amx         avx512bf16 + AMX-TILE/INT8/BF16, with the kernel's permission to use tile data granted (Sapphire
//               Rapids and later; Linux 5.16+ hands it out per process, so a kernel without it runs avx512bf16)
// Adding a level: one enum value, its feature test, and an entry in the families' tables that have a kernel
// for it (the others fall back to the level below).
#pragma once
#include <array>
#include <atomic>
#include <string>
#include <vector>

namespace fastdistill::cpu {

enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3, amx = 4 };
constexpr int kNumIsas = 5;

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avx512vbmi = false, avxvnni = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;  // amx_tile: also the OS granted tile data
};

const CpuFeatures& cpu_features();
bool isa_supported(CpuIsa isa);
CpuIsa best_supported_isa();
// The level in force: the requested one (env var or set_cpu_isa), else the best supported.
CpuIsa active_isa();
// Sets the level ("auto" restores the default). Throws if the CPU cannot run it.
void set_cpu_isa(const std::string& name);
const char* isa_name(CpuIsa isa);
// Every compiled level, best first.
std::vector<std::string> compiled_isas();

// A family's kernel table for each level (index = CpuIsa); a null entry means "the level below".
template <class Kernels>
using IsaTables = std::array<const Kernels*, kNumIsas>;

// The level whose table kernels_for would use (what `fastdistill info` reports per family).
template <class Kernels>
CpuIsa kernels_level(const IsaTables<Kernels>& tables, CpuIsa isa = active_isa()) {
  for (int i = int(isa); i > 0; --i)
    if (tables[i] != nullptr) return CpuIsa(i);
  return CpuIsa::scalar;
}

// The level of the table a family's last kernel call ran (-1: none yet): tests read it to prove that the switch
// reached the kernels, also where two levels give the same bits.
template <class Kernels>
std::atomic<int>& dispatched_level() {
  static std::atomic<int> level{-1};
  return level;
}

// The table of the level in force, or of the nearest level below that has one.
template <class Kernels>
const Kernels& kernels_for(const IsaTables<Kernels>& tables, CpuIsa isa = active_isa()) {
  const CpuIsa level = kernels_level(tables, isa);
  dispatched_level<Kernels>().store(int(level), std::memory_order_relaxed);
  return *tables[int(level)];
}

// While alive, this thread flushes denormal results to zero and reads denormal inputs as zero (MXCSR FTZ + DAZ;
// nothing on other CPUs). Exponentials of very negative arguments (the -inf logits of a masked vocabulary, the
// -inf fill of a row's tail lanes) otherwise underflow into denormals, and each costs a microcode assist.
class FlushDenormals {
 public:
  FlushDenormals();
  ~FlushDenormals();
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned saved_ = 0;
};

}  // namespace fastdistill::cpu

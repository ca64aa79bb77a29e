// Runtime CPU ISA selection. Every op family asks for the active level once per call; the level is
// chosen at first use from FASTDISTILL_CPU_ISA (avx512 | avx2 | scalar | auto) and the CPU's
// features, and can be changed at run time (tests run every path in one process).
#pragma once
#include <string>
#include <vector>

namespace fastdistill::cpu {

enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avx512vbmi = false, avxvnni = false;
};

const CpuFeatures& cpu_features();
CpuIsa best_supported_isa();
// The level in force: the requested one (env var or set_cpu_isa), else the best supported.
CpuIsa active_isa();
// Sets the level ("auto" restores the default). Throws if the CPU cannot run it.
void set_cpu_isa(const std::string& name);
const char* isa_name(CpuIsa isa);
std::vector<std::string> compiled_isas();

// While alive, this thread flushes denormal results to zero and reads denormal inputs as zero (MXCSR
// FTZ + DAZ; nothing on other CPUs). Exponentials of very negative arguments (the -inf logits of a masked
// vocabulary, the -inf fill of a row's tail lanes) otherwise underflow into denormals, and each one costs a
// microcode assist of ~150 cycles: the tail of a 1000-wide row alone cost 30% of the loss's time.
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

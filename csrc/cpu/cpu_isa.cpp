#include "cpu/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <algorithm>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastdistill::cpu {
namespace {

// FASTDISTILL_CPU_HIDE=avx512vnni,avx512bf16,...: run as if the CPU lacked these features (what fastdistill does on
// an AVX-512 CPU without VNNI, say, can be seen and tested on one that has it).
void hide_features(CpuFeatures& f) {
  const char* env = std::getenv("FASTDISTILL_CPU_HIDE");
  std::string list = env ? env : "";
  const std::pair<const char*, bool*> names[] = {
      {"avx2", &f.avx2}, {"fma", &f.fma}, {"f16c", &f.f16c}, {"bmi2", &f.bmi2}, {"avx512f", &f.avx512f},
      {"avx512bw", &f.avx512bw}, {"avx512vl", &f.avx512vl}, {"avx512dq", &f.avx512dq},
      {"avx512vnni", &f.avx512vnni}, {"avx512bf16", &f.avx512bf16}, {"avx512vbmi", &f.avx512vbmi},
      {"avxvnni", &f.avxvnni}, {"amx", &f.amx_tile}};
  for (size_t start = 0; start < list.size();) {
    const size_t end = std::min(list.find(',', start), list.size());
    const std::string name = list.substr(start, end - start);
    bool known = false;
    for (const auto& [n, flag] : names)
      if (name == n) *flag = false, known = true;
    if (!known && !name.empty())
      throw std::invalid_argument("fastdistill: FASTDISTILL_CPU_HIDE names an unknown CPU feature '" + name +
                                  "' (known: avx2, fma, f16c, bmi2, avx512f, avx512bw, avx512vl, avx512dq, avx512vnni, "
                                  "avx512bf16, avx512vbmi, avxvnni, amx)");
    start = end + 1;
  }
}

// Linux keeps AMX tile data off until a process asks (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+); a tile
// instruction without the grant is SIGILL. Asking once per process is enough for all its threads.
bool request_tile_data() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.bmi2 = __builtin_cpu_supports("bmi2");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
  f.avx512vbmi = __builtin_cpu_supports("avx512vbmi");
  f.avxvnni = __builtin_cpu_supports("avxvnni");
  f.amx_int8 = __builtin_cpu_supports("amx-int8");
  f.amx_bf16 = __builtin_cpu_supports("amx-bf16");
  f.amx_tile = __builtin_cpu_supports("amx-tile") && request_tile_data();
#endif
  hide_features(f);
  return f;
}

constexpr const char* kChoices = "auto, amx, avx512bf16, avx512, avx2, scalar";

CpuIsa parse(const std::string& name, const char* origin) {
  for (int i = 0; i < kNumIsas; ++i)
    if (name == isa_name(CpuIsa(i))) return CpuIsa(i);
  throw std::invalid_argument(std::string("fastdistill: ") + origin + " must be one of " + kChoices + "; got '" +
                              name + "'");
}

CpuIsa checked(CpuIsa isa, const char* origin) {
  if (!isa_supported(isa))
    throw std::runtime_error(std::string("fastdistill: ") + origin + " asks for the " + isa_name(isa) +
                             " path, which this CPU cannot run (best available: " +
                             isa_name(best_supported_isa()) + ")");
  return isa;
}

CpuIsa from_env() {
  const char* env = std::getenv("FASTDISTILL_CPU_ISA");
  if (env == nullptr || std::string(env).empty() || std::string(env) == "auto") return best_supported_isa();
  return checked(parse(env, "FASTDISTILL_CPU_ISA"), "FASTDISTILL_CPU_ISA");
}

std::atomic<int> g_isa{-1};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

bool isa_supported(CpuIsa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case CpuIsa::scalar: return true;
    case CpuIsa::avx2: return f.avx2 && f.fma && f.f16c && f.bmi2;
    case CpuIsa::avx512:
      return isa_supported(CpuIsa::avx2) && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni &&
             f.avx512vbmi;
    case CpuIsa::avx512bf16: return isa_supported(CpuIsa::avx512) && f.avx512bf16;
    case CpuIsa::amx: return isa_supported(CpuIsa::avx512bf16) && f.amx_tile && f.amx_int8 && f.amx_bf16;
  }
  return false;
}

CpuIsa best_supported_isa() {
  for (int i = kNumIsas - 1; i > 0; --i)
    if (isa_supported(CpuIsa(i))) return CpuIsa(i);
  return CpuIsa::scalar;
}

CpuIsa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(from_env());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(v);
}

void set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    g_isa.store(static_cast<int>(from_env()), std::memory_order_relaxed);
    return;
  }
  g_isa.store(static_cast<int>(checked(parse(name, "set_cpu_isa"), "set_cpu_isa")), std::memory_order_relaxed);
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar: return "scalar";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx512bf16: return "avx512bf16";
    case CpuIsa::amx: return "amx";
  }
  return "?";
}

std::vector<std::string> compiled_isas() {
#if defined(__x86_64__)
  return {"amx", "avx512bf16", "avx512", "avx2", "scalar"};
#else
  return {"scalar"};
#endif
}

#if defined(__x86_64__)
constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
FlushDenormals::FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
FlushDenormals::~FlushDenormals() { _mm_setcsr(saved_); }
#else
FlushDenormals::FlushDenormals() = default;
FlushDenormals::~FlushDenormals() = default;
#endif

}  // namespace fastdistill::cpu

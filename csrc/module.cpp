// The Python module fastdistill._C: loading it registers every op (ops.cpp and the per-device
// TORCH_LIBRARY_IMPL files). The few pybind functions here are build and ISA introspection, not ops.
#include <torch/extension.h>

#include "cpu/cpu_isa.h"

namespace {

std::vector<std::string> cuda_archs() {
#ifdef FASTDISTILL_WITH_CUDA
  std::vector<std::string> out;
  std::string s = FASTDISTILL_CUDA_ARCHS, cur;
  for (char c : s + ";") {
    if (c == ';') { if (!cur.empty()) out.push_back("sm_" + cur); cur.clear(); } else cur += c;
  }
  return out;
#else
  return {};
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using namespace fastdistill::cpu;
  m.def("built_with_cuda", [] {
#ifdef FASTDISTILL_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", &cuda_archs);
  m.def("compiled_cpu_isas", &compiled_isas);
  m.def("best_cpu_isa", [] { return std::string(isa_name(best_supported_isa())); });
  m.def("active_cpu_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_cpu_isa", &set_cpu_isa, "Force a CPU ISA path: avx512 | avx2 | scalar | auto");
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    return std::map<std::string, bool>{
        {"avx2", f.avx2}, {"fma", f.fma}, {"f16c", f.f16c}, {"bmi2", f.bmi2},
        {"avx512f", f.avx512f}, {"avx512bw", f.avx512bw}, {"avx512vl", f.avx512vl},
        {"avx512dq", f.avx512dq}, {"avx512vnni", f.avx512vnni}, {"avx512bf16", f.avx512bf16},
        {"avx512vbmi", f.avx512vbmi}, {"avxvnni", f.avxvnni}};
  });
}

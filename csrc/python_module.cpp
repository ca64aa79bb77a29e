// The Python module fastdistill._C: loading it registers every op (ops.cpp and the per-device TORCH_LIBRARY_IMPL
// files). The few pybind functions here describe the build, the CPU ISA levels and the packed layouts; none is an op.
#include <torch/extension.h>

#include "cpu/cpu_isa.h"
#include "cpu/conv_kernels.h"
#include "cpu/int8_kernels.h"
#include "cpu/kd_loss_kernels.h"
#include "cpu/sparse24_kernels.h"
#include "cpu/task_runner.h"
#include "fastdistill/int8.h"

namespace {

using namespace fastdistill::cpu;

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

// The level whose kernels each family runs at the level in force (a family without a kernel of its own for a
// level runs the one below).
std::map<std::string, std::string> kernel_levels() {
  return {{"kd_loss", isa_name(kernels_level(kd::kd_tables()))},
          {"int8", isa_name(kernels_level(int8::int8_tables()))},
          {"conv", isa_name(kernels_level(conv::conv_tables()))},
          {"sparse24", isa_name(kernels_level(sparse24::sparse24_tables()))}};
}

// The level each family's last CPU kernel call ran ("none" before the first).
std::map<std::string, std::string> dispatched_levels() {
  auto name = [](int level) { return std::string(level < 0 ? "none" : isa_name(CpuIsa(level))); };
  return {{"kd_loss", name(dispatched_level<kd::KdKernels>().load())},
          {"int8", name(dispatched_level<int8::Int8Kernels>().load())},
          {"conv", name(dispatched_level<conv::ConvKernels>().load())},
          {"sparse24", name(dispatched_level<sparse24::Sparse24Kernels>().load())}};
}

// The constants of int8_pack_weight's layout on a device type ("cpu" or "cuda"), from which ops.py computes
// the packed size, symbolically under torch.compile: header + round_up(n, row_block) * (row_bytes +
// round_up(k, k_align)) + (k_tail ? round_up(k, k_align) - k : 0).
std::map<std::string, int64_t> int8_packed_layout(const std::string& device) {
  if (device == "cpu" || device == "meta")
    return {{"header", int8::kHeaderBytes}, {"row_block", int8::kNB}, {"row_bytes", 4}, {"k_align", int8::kKG},
            {"k_tail", 0}};
  if (device == "cuda")
    return {{"header", 0}, {"row_block", 1}, {"row_bytes", 0}, {"k_align", fastdistill::int8::kKAlign}, {"k_tail", 1}};
  throw std::invalid_argument("fastdistill.int8_pack_weight: no packed layout for device type '" + device + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
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
  m.def("set_cpu_isa", &set_cpu_isa, "Force a CPU ISA level: avx512bf16 | avx512 | avx2 | scalar | auto");
  m.def("kernel_levels", &kernel_levels);
  m.def("dispatched_levels", &dispatched_levels);
  m.def("int8_packed_layout", &int8_packed_layout);
  m.def("int8_max_k", [] { return int8::kMaxK; }, "The largest K of the CPU int8 GEMMs (int32 accumulation)");
  m.def("int8_conv_gemm_k", &conv::gemm_k, "K of int8_conv2d's implicit GEMM for (cin, kh, kw), groups == 1");
  m.def("int8_conv_packed_bytes", &conv::packed_bytes,
        "Bytes of int8_conv2d_pack_weight's CPU output for (cout, cin, kh, kw, groups)");
  m.def("threads_for_work", &fastdistill::cpu::threads_for_work,
        "Threads the CPU ops wake for this much work (int8 multiply-add equivalents); 1 = no parallel region");
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    return std::map<std::string, bool>{
        {"avx2", f.avx2}, {"fma", f.fma}, {"f16c", f.f16c}, {"bmi2", f.bmi2},
        {"avx512f", f.avx512f}, {"avx512bw", f.avx512bw}, {"avx512vl", f.avx512vl},
        {"avx512dq", f.avx512dq}, {"avx512vnni", f.avx512vnni}, {"avx512bf16", f.avx512bf16},
        {"avx512vbmi", f.avx512vbmi}, {"avxvnni", f.avxvnni}};
  });
}

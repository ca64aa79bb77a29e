"""The dry run's static checks (benchmarks/gpu_check.sh --dry-run), no GPU needed:

    python benchmarks/gpu_check/preflight.py kernels        # kernels.py lists every FD_KERNEL, all in fastdistill::
    python benchmarks/gpu_check/preflight.py build-config   # setup.py configures the GPU machine's CUDA build

Run from the repository root. Exit status 1 on any failed check, each printed."""
import glob
import os
import re
import subprocess
import sys

from kernels import KERNEL_FILTER, KERNELS

KERNEL_DEF = re.compile(r"FD_KERNEL\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")
TORCH_INCLUDE = re.compile(r'#include\s*[<"](torch|ATen|c10)/')


def check_kernels():
    problems, found = [], {}
    for path in sorted(glob.glob("csrc/include/fastdistill/*.cuh")):
        text = open(path).read()
        for m in KERNEL_DEF.finditer(text):
            found[m.group(1)] = path
            # The sanitizer's kernel filter matches on the namespace: each kernel must sit inside fastdistill::.
            opened = [n.start() for n in re.finditer(r"namespace\s+fastdistill\b", text) if n.start() < m.start()]
            closed = [n.start() for n in re.finditer(r"}\s*//\s*namespace\s+fastdistill", text) if n.start() < m.start()]
            if len(opened) <= len(closed):
                problems.append(f"{m.group(1)} ({path}) is outside namespace {KERNEL_FILTER}:: (kns={KERNEL_FILTER} misses it)")
    listed = {k for ks in KERNELS.values() for k in ks}
    problems += [f"{k} ({found[k]}) has no sanitizer driver: add it to benchmarks/gpu_check/kernels.py"
                 for k in sorted(set(found) - listed)]
    problems += [f"{k} is in kernels.py but defined in no .cuh" for k in sorted(listed - set(found))]
    if not found:
        problems.append("no FD_KERNEL found under csrc/include/fastdistill/")
    print(f"kernels: {len(found)} FD_KERNEL definitions, {len(listed)} in kernels.py")
    return problems


def check_build_config():
    from setuptools import distutils  # noqa: F401  (setuptools' distutils, as setup.py's build uses)
    from distutils.core import run_setup

    import torch

    problems = []
    os.environ.update(FASTDISTILL_CUDA="1", FASTDISTILL_CUDA_ARCHS="90")
    try:
        dist = run_setup("setup.py", script_args=["build_ext"], stop_after="init")
    except SystemExit as exc:  # setup.py's own refusal (CPU-only torch, no nvcc)
        return [f"setup.py with FASTDISTILL_CUDA=1 refused: {exc}"]
    ext = {e.name: e for e in dist.ext_modules}.get("fastdistill._C")
    if ext is None:
        return ["setup.py declares no fastdistill._C"]
    cu = sorted(s for s in ext.sources if s.endswith(".cu"))
    want_cu = sorted(glob.glob("csrc/cuda/*.cu"))
    if cu != want_cu or not cu:
        problems.append(f"fastdistill._C compiles {cu}, expected every csrc/cuda/*.cu ({want_cu})")
    if not any(s.endswith("_cuda.cpp") for s in ext.sources):
        problems.append("fastdistill._C has no csrc/cuda/*_cuda.cpp (the CUDA op registrations)")
    nvcc_flags = ext.extra_compile_args.get("nvcc", []) if isinstance(ext.extra_compile_args, dict) else []
    gencode = [f for f in nvcc_flags if f.startswith("-gencode")]
    if gencode != ["-gencode=arch=compute_90,code=sm_90"]:
        problems.append(f"nvcc targets {gencode}, expected sm_90 alone")
    if ("FASTDISTILL_WITH_CUDA", "1") not in ext.define_macros:
        problems.append("FASTDISTILL_WITH_CUDA is not defined")
    if "cudart" not in ext.libraries:
        problems.append(f"fastdistill._C does not link cudart (libraries {ext.libraries}): not a CUDAExtension")
    # torch's BuildExtension refuses an nvcc whose CUDA major differs from torch's.
    from torch.utils.cpp_extension import CUDA_HOME

    out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    nvcc = re.search(r"release (\d+)\.(\d+)", out)
    if nvcc is None or nvcc.group(1) != str(torch.version.cuda).split(".")[0]:
        problems.append(f"nvcc {nvcc and nvcc.group(0)} vs torch's CUDA {torch.version.cuda}: majors differ")
    # The .cu files stay torch-free (a short nvcc compile): no torch/ATen/c10 header, directly or via ours.
    for path in want_cu + sorted(glob.glob("csrc/include/fastdistill/*")):
        for line in open(path):
            if TORCH_INCLUDE.search(line):
                problems.append(f"{path} includes a torch header ({line.strip()}): keep them out of nvcc's files")
    print(f"build-config: fastdistill._C from {len(ext.sources)} sources ({len(cu)} .cu), nvcc {' '.join(gencode)}, "
          f"{nvcc and nvcc.group(0)} for torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}")
    return problems


if __name__ == "__main__":
    checks = {"kernels": check_kernels, "build-config": check_build_config}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(checks)}}}")
    found = checks[sys.argv[1]]()
    for p in found:
        print("FAIL:", p)
    sys.exit(1 if found else 0)

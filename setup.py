"""Builds fastdistill._C (CPU kernels, plus CUDA kernels when enabled) and fastdistill._simt
(the GPU kernels and launchers compiled for the CPU SIMT emulator, as test-only ops).

FASTDISTILL_CUDA=auto (default) builds CUDA when torch has CUDA and nvcc is found,
=1 requires it (fails loudly otherwise), =0 never builds it.
FASTDISTILL_CUDA_ARCHS (default "80;90") picks the SM targets.
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    mode = os.environ.get("FASTDISTILL_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTDISTILL_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if not nvcc:
        reasons.append("nvcc not found (set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda)")
    if mode == "1" and reasons:
        raise SystemExit("FASTDISTILL_CUDA=1 but CUDA cannot be built: " + "; ".join(reasons))
    return not reasons


def sources(pattern):
    return sorted(glob.glob(os.path.join("csrc", pattern)))


with_cuda = want_cuda()
archs = os.environ.get("FASTDISTILL_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
define_macros = [("FASTDISTILL_CUDA_ARCHS", '"' + ";".join(archs) + '"')] if with_cuda else []

c_sources = sources("*.cpp") + sources("cpu/*.cpp")
if with_cuda:
    c_sources += sources("cuda/*.cpp") + sources("cuda/*.cu")
    nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ext = CUDAExtension(
        "fastdistill._C", c_sources, include_dirs=include_dirs,
        define_macros=define_macros + [("FASTDISTILL_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
else:
    ext = CppExtension(
        "fastdistill._C", c_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
extensions = [ext]

# Hidden symbols: the emulator's GPU launchers have the same names as the CUDA ones in _C.
extensions.append(CppExtension(
    "fastdistill._simt", sources("simt_ops/*.cpp"), include_dirs=include_dirs,
    extra_compile_args={"cxx": cxx_flags + ["-DFASTDISTILL_SIMT_EMULATOR=1", "-fvisibility=hidden"]},
    extra_link_args=["-fopenmp"]))

if shutil.which("ninja") is None:
    print("fastdistill: ninja not found; building without it (slow)")


class CachedBuildExtension(BuildExtension):
    """pip's editable install builds in a fresh temp dir each time; a fixed one lets ninja
    rebuild only what changed (a full build takes minutes on 2 cores)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(ext_modules=extensions, cmdclass={"build_ext": CachedBuildExtension.with_options(use_ninja=True)})

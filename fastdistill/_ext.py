"""Loads the compiled extension. Importing fastdistill never fails because of it: a missing
extension, or a device without kernels for an op, surfaces as a clear error when the op is called."""
import torch

try:
    from fastdistill import _C  # noqa: F401  (registers torch.ops.fastdistill.*)

    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_available = set()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.fastdistill.<op> has a kernel for this device type in this build."""
    if _C is None or device_type not in _DISPATCH_KEY:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdistill::{op}", _DISPATCH_KEY[device_type])


def require(op: str, device: torch.device) -> None:
    """Raise a clear error if op cannot run on device. Cached (the cache is looked at first: this runs on every
    call of an op, where a microsecond matters), and skipped while compiling: is_compiling() comes first so that
    dynamo never reads the cache, whose later growth would otherwise fail a guard and recompile the graph."""
    if torch.compiler.is_compiling() or (op, device.type) in _available:
        return
    if _C is None:
        raise RuntimeError(
            f"fastdistill.{op}: the compiled extension fastdistill._C failed to load ({LOAD_ERROR}). "
            "Rebuild with `pip install --no-build-isolation -e .` against the installed torch.")
    if device.type in ("meta",):
        return
    if not has_kernel(op, device.type):
        if device.type == "cuda" and not _C.built_with_cuda():
            why = ("this build has no CUDA kernels (built with FASTDISTILL_CUDA=0, a CPU-only torch, "
                   "or without nvcc); rebuild with FASTDISTILL_CUDA=1 CUDA_HOME=/usr/local/cuda")
        else:
            why = f"no {device.type} kernel is registered for it in this build"
        raise NotImplementedError(f"fastdistill.{op}: cannot run on {device}: {why}")
    _available.add((op, device.type))

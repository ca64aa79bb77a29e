"""CPU ISA path control. The path is chosen once from FASTDISTILL_CPU_ISA (amx | avx512bf16 | avx512 |
avx2 | scalar | auto) and the CPU; `set_cpu_isa` / `cpu_isa` change it at run time (tests use them to run every path)."""
import contextlib

from fastdistill import _ext


def _c():
    if _ext._C is None:
        raise RuntimeError(f"fastdistill: the compiled extension failed to load ({_ext.LOAD_ERROR})")
    return _ext._C


def active_cpu_isa() -> str:
    return _c().active_cpu_isa()


def available_cpu_isas() -> list:
    """The compiled ISA paths this CPU can run, best first."""
    order = ["amx", "avx512bf16", "avx512", "avx2", "scalar"]
    best = order.index(_c().best_cpu_isa())
    return [isa for isa in order[best:] if isa in _c().compiled_cpu_isas()]


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels onto one path: 'amx', 'avx512bf16', 'avx512', 'avx2', 'scalar' or 'auto'."""
    _c().set_cpu_isa(name)


@contextlib.contextmanager
def cpu_isa(name: str):
    """Context manager: run the enclosed code on one CPU ISA path, then restore the previous one."""
    previous = active_cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)

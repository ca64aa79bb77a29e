"""Timing, cold-cache weight rotation and machine limits, shared by every benchmark family."""
import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class Case:
    """One benchmark row: fastdistill's callable and the baselines a user would pick instead."""

    family: str                       # "kd" | "int8" | "sparse"
    op: str                           # e.g. "kd_loss fwd+bwd", "int8_linear"
    shape: str                        # human-readable, e.g. "M=1 K=4096 N=4096"
    dtype: str
    run: Callable[[], object]         # fastdistill
    baselines: Dict[str, Callable[[], object]]
    bytes: float = 0.0                # minimum bytes that must move per call (memory floor)
    flops: float = 0.0                # (dense-equivalent) FLOPs or int OPs per call
    cold: bool = False                # weights rotate through >= COLD_BYTES of copies (2x LLC, >= 256 MB)
    peak_kind: str = "fp32"           # which compute roofline applies: fp32 | int8
    note: str = ""
    extra: Dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. peak memory


def sync(device: str = "cpu"):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, min_time: float = 0.0,
            device: str = "cpu") -> List[float]:
    """Seconds per call for `repeats` timed calls (after warm-up). Each sample is one call unless the
    call is shorter than min_time, in which case a sample averages enough back-to-back calls. On CUDA the
    GPU times it (fastdistill.bench.gpu.cuda_time: a CUDA graph of many calls between CUDA events)."""
    if device == "cuda":
        from fastdistill.bench.gpu import cuda_time

        return cuda_time(fn, repeats=repeats, warmup=warmup, min_time=min_time)
    for _ in range(warmup):
        fn()
    sync(device)
    inner = 1
    if min_time > 0:
        t0 = time.perf_counter()
        fn()
        sync(device)
        inner = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return samples


def summarize(samples: List[float]) -> Dict[str, float]:
    med = statistics.median(samples)
    return {"median": med, "min": min(samples), "spread": (max(samples) - min(samples)) / med if med else 0.0}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def resident_rise_during(fn: Callable[[], object]) -> int:
    """Bytes by which this process's resident set rose above its level before fn() at fn's high-water mark
    (Linux: /proc/self/status). getrusage's ru_maxrss survives fork + exec (it would report the parent's peak);
    VmHWM belongs to this process's memory map, and writing 5 to clear_refs resets it to the current RSS. The
    peak-memory benchmarks call it in a fresh process, after a warm-up."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS") * 1024
    fn()
    return _status_kb("VmHWM") * 1024 - before


def last_level_cache_bytes() -> int:
    """The largest CPU cache this OS reports (sysfs), 0 if unknown."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best


# Weight copies that cold-cache cases rotate through, and the size of the memory-bandwidth probe: twice
# the last-level cache, and never under 256 MB. A fixed 256 MB was not enough: one dev machine reports a
# 480 MB L3, and an AMD one's two CCDs hold 64 MB together; a GEMV "streamed" faster than DRAM there.
COLD_BYTES = max(256 << 20, 2 * last_level_cache_bytes())


class Rotating:
    """Cycles through copies of a weight set so that each call streams its weights from DRAM, as in
    a real model whose layers do not fit in cache. `make()` builds one copy (a tuple of tensors)."""

    def __init__(self, make: Callable[[], tuple], min_bytes: int = COLD_BYTES, max_copies: int = 4096):
        first = make()
        per_copy = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
        n = self.copies_needed(per_copy, min_bytes, max_copies)
        self.copies = [first] + [make() for _ in range(n - 1)]
        self.bytes_per_copy = per_copy
        self.i = 0

    @staticmethod
    def copies_needed(bytes_per_copy: int, min_bytes: int, max_copies: int) -> int:
        return max(1, min(max_copies, -(-min_bytes // max(bytes_per_copy, 1))))

    def next(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


_LIMITS: Optional[Dict[str, float]] = None


def machine_limits(device: str = "cpu") -> Dict[str, float]:
    """Memory bandwidth (GB/s) and compute peaks (GFLOP/s, GOP/s), measured now on this machine."""
    global _LIMITS
    if _LIMITS is not None and _LIMITS.get("device") == device:
        return _LIMITS
    if device == "cuda":
        from fastdistill.bench.gpu import cuda_limits

        _LIMITS = cuda_limits()
        return _LIMITS
    src = torch.empty(COLD_BYTES // 4, dtype=torch.float32)  # far beyond the LLC
    src.fill_(1.0)
    half_a, half_b = src[: src.numel() // 2], src[src.numel() // 2:]
    # DRAM read bandwidth: the best of a one-stream (sum) and a two-stream (dot) read of COLD_BYTES.
    t_read = min(min(time_fn(lambda: src.sum(), repeats=5)), min(time_fn(lambda: torch.dot(half_a, half_b), repeats=5)))
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm = min(time_fn(lambda: a @ b, repeats=5))
    ai = torch.randint(-127, 127, (1024, 4096), dtype=torch.int8)
    bi = torch.randint(-127, 127, (4096, 1024), dtype=torch.int8)
    try:
        t_i8 = min(time_fn(lambda: torch._int_mm(ai, bi), repeats=3))
        int8 = 2 * 1024 * 4096 * 1024 / t_i8 / 1e9
    except RuntimeError:
        int8 = float("nan")
    _LIMITS = {"device": "cpu", "mem_gbps": src.numel() * 4 / t_read / 1e9,
               "fp32_gflops": 2 * n**3 / t_mm / 1e9, "int8_gops": int8, "threads": torch.get_num_threads()}
    return _LIMITS

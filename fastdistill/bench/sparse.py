"""2:4 sparsity benchmark cases: fastdistill sparse24_linear (fp32 and bf16 values) and
sparse24_int8_linear vs dense F.linear in fp32 and bf16 (MKL) and fastdistill's dense int8
(int8_linear, dynamic W8A8), all measured in the same run.

Small M (<= 16) is weight streaming: every implementation rotates through COLD_BYTES (2x LLC) of weight copies
(common.Rotating) so the weights come from DRAM. `bytes` is the compressed weight size (values +
meta), `flops` the dense-equivalent 2*M*N*K, so GFLOP/s are comparable with the dense baselines.
Weights are built lazily, one shape at a time, so a full run fits in a few GB.
"""
import math
from typing import List

import torch
import torch.nn.functional as F

from fastdistill import _ext, ops
from fastdistill.bench.common import Case, Rotating
from fastdistill.sparse import compress_2_4

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (768, 3072)]  # (K, N)
MS = [1, 4, 16, 128, 1024]
QUICK_SHAPES = [(768, 3072)]
QUICK_MS = [1, 128]
COLD_M = 16


def _dense_int8_available() -> bool:
    try:
        return _ext.has_kernel("int8_linear", "cpu") and _ext.has_kernel("int8_pack_weight", "cpu")
    except RuntimeError:  # the op is not defined in this build (int8 family absent)
        return False


class _Fixed:
    def __init__(self, copy):
        self.copy = copy

    def next(self):
        return self.copy


class _Weights:
    """One (K, N, cold) weight set in every format; only the most recent set is kept alive."""

    _current = None

    @classmethod
    def get(cls, k, n, cold):
        if cls._current is None or cls._current.key != (k, n, cold):
            cls._current = None  # free the previous set first
            cls._current = cls(k, n, cold)
        return cls._current

    def __init__(self, k, n, cold):
        self.key = (k, n, cold)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) / math.sqrt(k)
        values, meta = compress_2_4(w)
        scales = values.abs().amax(1) / 127
        q = torch.round(values / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        wrap = Rotating if cold else (lambda make: _Fixed(make()))
        self.sp32 = wrap(lambda: (values.clone(), meta.clone()))
        self.sp16 = wrap(lambda: (values.bfloat16(), meta.clone()))
        self.sp8 = wrap(lambda: (q.clone(), meta.clone(), scales.clone()))
        self.d32 = wrap(lambda: (w.clone(),))
        self.d16 = wrap(lambda: (w.bfloat16(),))
        self.d8 = None
        if _dense_int8_available():
            qd, sd = ops.quantize_per_channel(w)
            self.d8 = wrap(lambda: (ops.int8_pack_weight(qd), sd.clone()))


def _case(k, n, m, dtype, quick_note=""):
    cold = m <= COLD_M
    x32 = torch.randn(m, k)
    x16 = x32.bfloat16()
    W = lambda: _Weights.get(k, n, cold)  # noqa: E731
    if dtype == "fp32":
        run = lambda: ops.sparse24_linear(x32, *W().sp32.next(), None)  # noqa: E731
        vbytes = 4
    elif dtype == "bf16":
        run = lambda: ops.sparse24_linear(x16, *W().sp16.next(), None)  # noqa: E731
        vbytes = 2
    else:
        run = lambda: ops.sparse24_int8_linear(x32, *W().sp8.next(), None)  # noqa: E731
        vbytes = 1
    baselines = {
        "fp32 F.linear": lambda: F.linear(x32, *W().d32.next()),
        "bf16 F.linear": lambda: F.linear(x16, *W().d16.next()),
    }
    if dtype == "int8" and _dense_int8_available():
        baselines["fastdistill dense int8"] = lambda: ops.int8_linear(x32, *W().d8.next(), None)
    weight_bytes = n * (k // 2) * vbytes + n * ((k + 7) // 8) + (4 * n if dtype == "int8" else 0)
    return Case(family="sparse", op=f"sparse24_linear {dtype}", shape=f"M={m} K={k} N={n}", dtype=dtype,
                run=run, baselines=baselines, bytes=float(weight_bytes + m * k * x32.element_size()),
                flops=2.0 * m * n * k, cold=cold, peak_kind="int8" if dtype == "int8" else "fp32",
                note=("dense int8 baseline: fastdistill int8_linear" if dtype == "int8" and _dense_int8_available()
                      else ("dense int8 baseline absent (int8_linear not in this build)" if dtype == "int8" else "")))


def cases(quick: bool = False, device: str = "cpu") -> List[Case]:
    if device != "cpu":
        return []  # the CUDA cases belong to the CUDA implementation of these ops
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if quick else (SHAPES, MS)
    out = [_case(k, n, m, dtype) for k, n in shapes for m in ms for dtype in ("fp32", "bf16", "int8")]
    return out + [_after_relu(768, 3072, m, dtype) for m in (1, 128) for dtype in ("fp32", "int8")]


def _after_relu(k, n, m, dtype):
    """The layer as a model runs it, right after an ATen op (relu), warm weights: catches threading that
    fights ATen's pool (OpenMP workers spin for a while after each region), which an op timed alone
    cannot show."""
    case = _case(k, n, m, dtype)
    x32 = torch.randn(m, k)
    W = lambda: _Weights.get(k, n, False)  # noqa: E731
    if dtype == "fp32":
        run = lambda: ops.sparse24_linear(torch.relu(x32), *W().sp32.next(), None)  # noqa: E731
    else:
        run = lambda: ops.sparse24_int8_linear(torch.relu(x32), *W().sp8.next(), None)  # noqa: E731
    baselines = {"fp32 F.linear": lambda: F.linear(torch.relu(x32), *W().d32.next())}
    if dtype == "int8" and _dense_int8_available():
        baselines["fastdistill dense int8"] = lambda: ops.int8_linear(torch.relu(x32), *W().d8.next(), None)
    return Case(family="sparse", op=f"relu -> sparse24_linear {dtype}", shape=case.shape, dtype=dtype, run=run,
                baselines=baselines, bytes=case.bytes, flops=case.flops, cold=False, peak_kind=case.peak_kind,
                note="after an ATen op, warm weights")

"""Benchmark cases for the lm_head fused into the distillation loss (forward KL, T = 2, batchmean, forward+backward,
the teacher as hidden states and head): fastdistill.fused_linear_kd_loss against the unfused path (F.linear, then
fastdistill.kd_loss), eager PyTorch (F.linear, then F.kl_div) and Liger's chunked LigerFusedLinearJSDLoss with
beta = 0 (forward KL; compiled, its default), when liger-kernel is installed. Liger's loss omits T^2: time and memory
are compared, not values. The FLOPs are the four GEMMs (student and teacher logits, hidden and weight gradients), so
'% roofline' is the share of the GEMM floor at the MKL rate the runner measures."""
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from fastdistill.bench.common import Case
from fastdistill.fused_linear import fused_linear_kd_loss
from fastdistill.loss import kd_loss
from fastdistill.reference import kd_loss_eager

FULL_SHAPES = [(1024, 1024, 32000, "fp32"), (1024, 1024, 32000, "bf16"), (2048, 2048, 128256, "bf16")]
QUICK_SHAPES = [(256, 256, 8000, "fp32"), (256, 256, 8000, "bf16")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 2.0
MEMORY_SHAPE = (2048, 1024, 32000)  # the memory target: <= 1/8 of one fp32 logits tensor beyond inputs + grads
QUICK_MEMORY_SHAPE = (512, 256, 8000)


def _liger_loss():
    """Liger's chunked fused-linear JSD at beta = 0 (forward KL), soft loss only; None if liger-kernel is missing."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception:  # not installed, or it fails to import on this machine
        return None
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=TEMPERATURE)


def _inputs(rows, hidden, vocab, dtype, device="cpu"):
    g = torch.Generator(device=device).manual_seed(0)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    h = make(rows, hidden).requires_grad_()
    w = make(vocab, hidden, scale=hidden ** -0.5).requires_grad_()
    th, tw = make(rows, hidden), make(vocab, hidden, scale=hidden ** -0.5)
    labels = torch.randint(0, vocab, (rows,), generator=g, device=device)
    return h, w, th, tw, labels


def _step(fn, h, w):
    def run():
        fn().backward()
        h.grad = w.grad = None
    return run


def implementations(h, w, th, tw, labels):
    """name -> a zero-argument callable returning the loss (None where the implementation is unavailable)."""
    liger = _liger_loss()

    def unfused():
        with torch.no_grad():
            t = F.linear(th, tw)
        return kd_loss(F.linear(h, w), t, temperature=TEMPERATURE)

    def eager():
        with torch.no_grad():
            t = F.linear(th, tw)
        return kd_loss_eager(F.linear(h, w), t, TEMPERATURE)

    return {
        "fastdistill": lambda: fused_linear_kd_loss(h, w, th, tw, temperature=TEMPERATURE),
        "unfused": unfused,
        "eager": eager,
        "liger (compiled)": None if liger is None else lambda: liger(h, w, th, tw, labels),
    }


def _not_installed():
    raise RuntimeError("not installed (pip install liger-kernel)")


def cases(quick: bool = False, device: str = "cpu"):
    out = []
    for rows, hidden, vocab, name in (QUICK_SHAPES if quick else FULL_SHAPES):
        h, w, th, tw, labels = _inputs(rows, hidden, vocab, DTYPES[name], device)
        impls = implementations(h, w, th, tw, labels)
        ours = impls.pop("fastdistill")
        baselines = {k: (_step(fn, h, w) if fn is not None else _not_installed) for k, fn in impls.items()}
        out.append(Case(
            family="fused_linear", op="fused_linear_kd_loss fwd+bwd", shape=f"{rows}x{hidden}->{vocab}", dtype=name,
            run=_step(ours, h, w), baselines=baselines, flops=4 * 2 * rows * hidden * vocab,
            note="forward KL, T=2, batchmean; teacher as hidden + head; flops = the four GEMMs"))
    return out


_PEAK_SCRIPT = r"""
import sys, torch
from fastdistill.bench.common import resident_rise_during
from fastdistill.bench.fused_linear import _inputs, implementations
rows, hidden, vocab = (int(a) for a in sys.argv[1:4])
dtype, which = getattr(torch, sys.argv[4]), sys.argv[5]
def step(r):
    h, w, th, tw, labels = _inputs(r, hidden, vocab, dtype)
    fn = implementations(h, w, th, tw, labels)[which]
    if fn is None:
        print("nan"); sys.exit(0)
    fn().backward()
    return h, w, th, tw, labels
step(8)  # warm up on a small batch: libraries, kernels, compilation
h, w, th, tw, labels = _inputs(rows, hidden, vocab, dtype)
fn = implementations(h, w, th, tw, labels)[which]
rise = resident_rise_during(lambda: fn().backward())
grads = sum(x.grad.numel() * x.grad.element_size() for x in (h, w))
print((rise - grads) / (rows * vocab * 4))
"""


def peak_memory(rows: int, hidden: int, vocab: int, dtype: str = "float32", which: str = "fastdistill") -> float:
    """Extra peak memory of one forward+backward step beyond the inputs and the gradients, in units of one fp32
    logits tensor [rows, vocab]: (the resident high-water mark during the step - the resident set before it - the
    hidden and weight gradients). Measured from /proc/self/status (Linux) in a fresh process after a small warm-up,
    because torch's CPU allocations are invisible to tracemalloc. NaN where the implementation is not installed."""
    # A fixed glibc mmap threshold maps every block of 128 KiB or more on its own and unmaps it when freed, so the
    # resident set follows live memory; with the default dynamic threshold, freed blocks stay in per-thread heaps and
    # are reused or not from run to run (the same step measured anywhere from 0.07 to 0.29 logits tensors).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(rows), str(hidden), str(vocab), dtype, which],
                         capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def memory_report(quick: bool = False):
    rows, hidden, vocab = QUICK_MEMORY_SHAPE if quick else MEMORY_SHAPE
    report = []
    for dtype, name in (("float32", "fp32"),) if quick else (("float32", "fp32"), ("bfloat16", "bf16")):
        entry = {"shape": f"{rows}x{hidden}->{vocab}", "dtype": name}
        for which in ("fastdistill", "unfused", "eager", "liger (compiled)"):
            entry[which] = peak_memory(rows, hidden, vocab, dtype, which)
        report.append(entry)
    return report

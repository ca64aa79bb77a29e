"""Benchmark cases for the fused distillation loss: fastdistill vs eager PyTorch and torch.compile
of the same formula (forward KL, batchmean, T = 2), forward alone and forward + backward; plus
reverse KL and JSD (beta = 0.5) forward + backward on the first shape, and forward KL there with a masked
vocabulary (the last quarter of the columns at -1e4, as a padded vocabulary is masked)."""
import subprocess
import sys

import torch

from fastdistill.bench.common import Case
from fastdistill.loss import kd_loss
from fastdistill.reference import kd_jsd_eager, kd_loss_eager, kd_reverse_kl_eager, kd_topk_loss_reference

FULL_SHAPES = [(4096, 32000), (1024, 128256), (8192, 1000)]
QUICK_SHAPES = [(512, 32000), (64, 128256), (1024, 1000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 2.0
MASKED_FRACTION = 0.25
MASK_VALUE = -1e4  # finite, so that the eager formula stays finite (with -inf it gives 0 * inf = NaN)


def _fused(s, t):
    return kd_loss(s, t, temperature=TEMPERATURE)


def _eager(s, t):
    return kd_loss_eager(s, t, TEMPERATURE)


def _compiled_eager(formula=kd_loss_eager):
    """A fresh torch.compile of the eager formula per case: one shared compiled function would hit
    dynamo's recompile limit across shapes, dtypes and grad modes and silently fall back to eager."""
    compiled = torch.compile(formula, dynamic=False)
    return lambda s, t: compiled(s, t, TEMPERATURE)


# The other divergences, forward + backward on the first shape: (op, note, fastdistill, eager formula).
OTHER_DIVERGENCES = [
    ("kd_loss reverse_kl fwd+bwd", "reverse KL, T=2, batchmean",
     lambda s, t: kd_loss(s, t, temperature=TEMPERATURE, divergence="reverse_kl"), kd_reverse_kl_eager),
    ("kd_loss jsd fwd+bwd", "JSD beta=0.5, T=2, batchmean",
     lambda s, t: kd_loss(s, t, temperature=TEMPERATURE, divergence="jsd", beta=0.5), kd_jsd_eager),
]


TOPK_K = 64  # a typical offline cache (DistillKit stores k = 50-128)


def _topk_case(s, t, shape, name, logits_bytes):
    """kd_loss against the teacher's top-k (bucket tail, forward KL) vs the dense kd_loss on the same student, and
    the top-k formula in eager PyTorch and compiled."""
    topk = torch.log_softmax(t.float() / TEMPERATURE, -1).topk(TOPK_K, -1)
    idx, lp = topk.indices.to(torch.int32), topk.values.to(torch.float16)
    ours = lambda s, _t: kd_loss(s, teacher_topk=(idx, lp), temperature=TEMPERATURE)  # noqa: E731
    eager = lambda s, _t: kd_topk_loss_reference(s.float(), idx, lp.float(), temperature=TEMPERATURE)  # noqa: E731
    compiled = torch.compile(kd_topk_loss_reference, dynamic=False)
    return Case(
        family="kd", op=f"kd_loss topk{TOPK_K} fwd+bwd", shape=shape, dtype=name, run=_forward_backward(ours, s, t),
        baselines={"eager": _forward_backward(eager, s, t),
                   "torch.compile": _forward_backward(
                       lambda s, _t: compiled(s.float(), idx, lp.float(), temperature=TEMPERATURE), s, t),
                   "dense kd_loss": _forward_backward(_fused, s, t)},
        bytes=3 * logits_bytes, note=f"forward KL, bucket tail, k={TOPK_K} fp16 log-probs, T=2, batchmean")


def _forward(fn, s, t):
    def run():
        with torch.no_grad():
            return fn(s, t)
    return run


def _forward_backward(fn, s, t):
    def run():
        fn(s, t).backward()
        s.grad = None
    return run


def cases(quick: bool = False, device: str = "cpu"):
    out = []
    for rows, vocab in (QUICK_SHAPES if quick else FULL_SHAPES):
        for name, dtype in DTYPES.items():
            g = torch.Generator(device=device).manual_seed(0)
            s = (torch.randn(rows, vocab, generator=g, device=device) * 3).to(dtype).requires_grad_()
            t = (torch.randn(rows, vocab, generator=g, device=device) * 3).to(dtype)
            logits_bytes = rows * vocab * s.element_size()
            shape = f"{rows}x{vocab}"
            # The floor of a training step is 2 reads + 1 write: the gradient can be written while each row
            # is still in cache after its statistics (fastdistill does). Separate forward and backward
            # passes move 5 logits' worth.
            for op, wrap, nbytes in [("kd_loss fwd", _forward, 2 * logits_bytes),
                                     ("kd_loss fwd+bwd", _forward_backward, 3 * logits_bytes)]:
                out.append(Case(
                    family="kd", op=op, shape=shape, dtype=name, run=wrap(_fused, s, t),
                    baselines={"eager": wrap(_eager, s, t), "torch.compile": wrap(_compiled_eager(), s, t)},
                    bytes=nbytes, note="forward KL, T=2, batchmean"))
            first_shape = (rows, vocab) == (QUICK_SHAPES if quick else FULL_SHAPES)[0]
            for op, note, ours, formula in OTHER_DIVERGENCES if first_shape else []:
                eager = lambda s, t, formula=formula: formula(s, t, TEMPERATURE)  # noqa: E731
                out.append(Case(
                    family="kd", op=op, shape=shape, dtype=name, run=_forward_backward(ours, s, t),
                    baselines={"eager": _forward_backward(eager, s, t),
                               "torch.compile": _forward_backward(_compiled_eager(formula), s, t)},
                    bytes=3 * logits_bytes, note=note))
            if first_shape:
                out.append(_topk_case(s, t, shape, name, logits_bytes))
            if first_shape:
                # Masked columns underflow every exponential: on x86 each denormal result would cost a
                # microcode assist unless the kernels flush them.
                keep = int(vocab * (1 - MASKED_FRACTION))
                sm = s.detach().clone()
                sm[:, keep:] = MASK_VALUE
                sm.requires_grad_()
                tm = t.clone()
                tm[:, keep:] = MASK_VALUE
                out.append(Case(
                    family="kd", op="kd_loss fwd+bwd masked", shape=shape, dtype=name,
                    run=_forward_backward(_fused, sm, tm),
                    baselines={"eager": _forward_backward(_eager, sm, tm),
                               "torch.compile": _forward_backward(_compiled_eager(), sm, tm)},
                    bytes=3 * logits_bytes,
                    note=f"forward KL, T=2, batchmean, last {MASKED_FRACTION:.0%} of columns at {MASK_VALUE:g}"))
    return out


_PEAK_SCRIPT = r"""
import sys, torch
import fastdistill
from fastdistill.bench.common import resident_rise_during
from fastdistill.reference import kd_loss_eager
rows, vocab, dtype, which = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
if which == "fastdistill":
    fn = lambda s, t: fastdistill.kd_loss(s, t, temperature=2.0)
elif which == "eager":
    fn = lambda s, t: kd_loss_eager(s, t, 2.0)
else:
    compiled = torch.compile(kd_loss_eager, dynamic=True)
    fn = lambda s, t: compiled(s, t, 2.0)
def step(r):
    s = torch.randn(r, vocab).to(dtype).requires_grad_(); t = torch.randn(r, vocab).to(dtype)
    fn(s, t).backward()
    return s, t
step(8)  # warm up on a small batch: libraries, kernels, compilation
s = torch.randn(rows, vocab).to(dtype).requires_grad_(); t = torch.randn(rows, vocab).to(dtype)
rise = resident_rise_during(lambda: fn(s, t).backward())
logits = rows * vocab * s.element_size()
print((rise - s.grad.numel() * s.grad.element_size()) / logits)
"""


def peak_memory(rows: int, vocab: int, dtype: str = "float32", which: str = "fastdistill") -> float:
    """Extra peak memory of one forward+backward step beyond the inputs and the gradient, in units of
    one logits tensor: (high-water mark during the step - resident set before it - the gradient).
    Linux only (/proc/self/status and clear_refs).
    Runs in a fresh process (after a small warm-up) so the high-water mark belongs to this step."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(rows), str(vocab), dtype, which],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_report(quick: bool = False):
    """Extra peak memory of a fwd+bwd step per implementation, in logits tensors (fp32)."""
    rows = []
    for r, v in (QUICK_SHAPES[:1] if quick else FULL_SHAPES):
        entry = {"shape": f"{r}x{v}", "dtype": "fp32"}
        for which in ("fastdistill", "eager", "torch.compile"):
            entry[which] = peak_memory(r, v, "float32", which)
        rows.append(entry)
    return rows

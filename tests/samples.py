"""One list of sample inputs per op, as pytorch/extension-cpp's `sample_inputs`.

test_samples.py runs every sample on every backend (the CPU op on each ISA path, the CUDA op when a GPU
is present, the CUDA kernels through the SIMT emulator), checks it against the fp64 reference with the
rule "at most 2x the error of plain PyTorch in the same dtype", and runs opcheck on it. Shapes are
awkward on purpose: 1-row, odd K, K % 8 == 4, V not a multiple of any vector width, batch dims.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from fastdistill.reference import (compressed_2_4_sample, int8_linear_reference, int8_weight_only_linear_reference,
                                   kd_loss_reference, kd_topk_loss_reference, quantize_symmetric_reference,
                                   sparse24_linear_reference)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Sample:
    name: str
    args: Tuple  # CPU tensors; test_samples moves them to the backend's device

    def to(self, device) -> Tuple:
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in self.args)


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _err(y, ref) -> float:
    return (y.double() - ref).abs().max().item() if y.numel() else 0.0


def assert_within_torch_error(y, ref64, y_torch, what: str, floor: float):
    """Our error is at most 2x plain PyTorch's error in the same dtype, plus `floor` (absolute)."""
    err, base = _err(y, ref64), _err(y_torch, ref64)
    assert err <= 2 * base + floor, f"{what}: max error {err:.3g} vs plain PyTorch's {base:.3g} (floor {floor:.3g})"


# ------------------------------------------------------------------------------------------ kd_loss
KD_CASES = [  # rows, V, divergence, beta, temperature, hard_weight, with labels
    (1, 1, "forward_kl", 0.5, 1.0, 0.0, False),
    (3, 127, "forward_kl", 0.5, 2.0, 0.5, True),
    (5, 1003, "reverse_kl", 0.5, 1.0, 0.0, False),
    (2, 4099, "jsd", 0.3, 3.0, 1.0, True),
    (4, 33, "jsd", 0.0, 1.0, 0.0, False),
]


def _kd_samples() -> List[Sample]:
    out = []
    for sdt in FLOAT_DTYPES:
        for rows, V, div, beta, T, hw, with_labels in KD_CASES:
            s, t = _randn(rows, V, dtype=sdt, scale=3, seed=rows), _randn(rows, V, dtype=sdt, scale=3, seed=V)
            labels = None
            if with_labels:
                labels = torch.randint(0, V, (rows,), generator=torch.Generator().manual_seed(1))
                labels[0] = -100  # one ignored row
            name = f"{str(sdt)[6:]}-{rows}x{V}-{div}"
            out.append(Sample(name, (s, t, labels, T, div, beta, -100, T * T, hw)))
    return out


def _kd_rows(args, dtype):
    s, t, labels, T, div, beta, ignore, soft_coef, hw = args
    x = s.detach().to(dtype).requires_grad_()
    rows = kd_loss_reference(x, t.to(dtype), temperature=T, divergence=div, beta=beta, reduction="none",
                             labels=labels, ignore_index=ignore, soft_weight=soft_coef / (T * T), hard_weight=hw)
    return x, rows


def _grad_rows(args):
    return _randn(args[0].shape[0], seed=7).abs() + 0.5  # d loss / d row_loss != 1


GRAD_SCALE = 0.37  # kd_loss_fused's d loss / d row_loss (!= 1)


def check_kd_loss_forward(out, args):
    loss, stats = out
    assert loss.dtype == torch.float32 and stats.shape == (args[0].shape[0], 8)
    ref64 = _kd_rows(args, torch.float64)[1].detach()
    torch32 = _kd_rows(args, torch.float32)[1].detach()
    assert_within_torch_error(loss, ref64, torch32, "kd_loss_forward", 1e-5 * (1 + ref64.abs().max().item()))


def _kd_grad(args, dtype, grad_rows):
    x, rows = _kd_rows(args, dtype)
    rows.backward(grad_rows.to(dtype))
    return x.grad


def _check_kd_grad(grad, args, grad_rows, what):
    s = args[0]
    assert grad.dtype == s.dtype and grad.shape == s.shape
    ref64, torch32 = _kd_grad(args, torch.float64, grad_rows), _kd_grad(args, torch.float32, grad_rows)
    # the gradient is stored in the student's dtype: one rounding of it is allowed on top
    floor = torch.finfo(s.dtype).eps * ref64.abs().max().item() + 1e-6
    assert_within_torch_error(grad, ref64, torch32, what, floor)


def kd_backward_args(ns, args):
    """kd_loss_backward's arguments for a forward sample: random d loss / d row_loss, the forward's stats."""
    s, t, labels, *params = args
    stats = ns.kd_loss_forward(*args)[1]
    return (_grad_rows(args).to(s.device), s, t, labels, stats, *params)


def check_kd_loss_backward(grad, args):
    _check_kd_grad(grad, args, _grad_rows(args), "kd_loss_backward")


def check_kd_loss_fused(out, args):
    loss, stats, grad = out
    check_kd_loss_forward((loss, stats), args)
    _check_kd_grad(grad, args, torch.full((args[0].shape[0],), GRAD_SCALE), "kd_loss_fused")


# ------------------------------------------------------------------------------- kd_loss, top-k teacher
TOPK_CASES = [  # rows, V, k, divergence, beta, temperature, hard_weight, with labels, tail
    (1, 1, 1, "forward_kl", 0.5, 1.0, 0.0, False, "bucket"),
    (3, 127, 5, "forward_kl", 0.5, 2.0, 0.5, True, "bucket"),
    (4, 33, 33, "reverse_kl", 0.5, 1.0, 0.0, False, "bucket"),  # every token: no tail
    (2, 1003, 40, "jsd", 0.3, 3.0, 1.0, True, "bucket"),
    (3, 301, 9, "forward_kl", 0.5, 1.5, 0.3, True, "renormalize"),
]


def _topk_samples() -> List[Sample]:
    out = []
    for sdt in FLOAT_DTYPES:
        for rows, V, k, div, beta, T, hw, with_labels, tail in TOPK_CASES:
            s, t = _randn(rows, V, dtype=sdt, scale=3, seed=rows), _randn(rows, V, scale=3, seed=V)
            lp, idx = torch.log_softmax(t / T, -1).topk(k, -1)
            if k > 1:
                lp[0, -1] = float("-inf")  # an unused slot
            labels = None
            if with_labels:
                labels = torch.randint(0, V, (rows,), generator=torch.Generator().manual_seed(1))
                labels[0] = -100  # one ignored row
            name = f"{str(sdt)[6:]}-{rows}x{V}-k{k}-{div}-{tail}"
            out.append(Sample(name, (s, idx.to(torch.int32), lp.to(torch.bfloat16), labels, T, div, beta, -100,
                                     T * T, hw, tail)))
    return out


def _topk_rows(args, dtype):
    s, idx, lp, labels, T, div, beta, ignore, soft_coef, hw, tail = args
    x = s.detach().to(dtype).requires_grad_()
    rows = kd_topk_loss_reference(x, idx.cpu(), lp.to(dtype), topk_tail=tail, temperature=T, divergence=div,
                                  beta=beta, reduction="none", labels=labels, ignore_index=ignore,
                                  soft_weight=soft_coef / (T * T), hard_weight=hw)
    return x, rows


def check_kd_topk_forward(out, args):
    loss, stats = out
    assert loss.dtype == torch.float32 and stats.shape == (args[0].shape[0], 8)
    ref64 = _topk_rows(args, torch.float64)[1].detach()
    torch32 = _topk_rows(args, torch.float32)[1].detach()
    assert_within_torch_error(loss, ref64, torch32, "kd_topk_forward", 1e-5 * (1 + ref64.abs().max().item()))


def kd_topk_backward_args(ns, args):
    s, idx, lp, labels, *params = args
    stats = ns.kd_topk_forward(*args)[1]
    return (_grad_rows(args).to(s.device), s, idx, lp, labels, stats, *params)


def check_kd_topk_backward(grad, args, grad_rows=None):
    s = args[0]
    grad_rows = _grad_rows(args) if grad_rows is None else grad_rows
    assert grad.dtype == s.dtype and grad.shape == s.shape

    def grad_in(dtype):
        x, rows = _topk_rows(args, dtype)
        rows.backward(grad_rows.to(dtype))
        return x.grad

    ref64, torch32 = grad_in(torch.float64), grad_in(torch.float32)
    floor = torch.finfo(s.dtype).eps * ref64.abs().max().item() + 1e-6
    assert_within_torch_error(grad, ref64, torch32, "kd_topk_backward", floor)


def check_kd_topk_fused(out, args):
    loss, stats, grad = out
    check_kd_topk_forward((loss, stats), args)
    check_kd_topk_backward(grad, args, torch.full((args[0].shape[0],), GRAD_SCALE))


# --------------------------------------------------------------------------------------------- int8
LINEAR_SHAPES = [(1, 33, 7), (3, 64, 16), (17, 260, 9), (2, 1028, 40)]  # M, K, N


def _x_samples() -> List[Sample]:
    out = []
    for dtype in FLOAT_DTYPES:
        for shape in [(1, 1), (3, 15), (2, 3, 33), (4, 1000)]:
            x = _randn(*shape, dtype=dtype, scale=2)
            x.view(-1, shape[-1])[0] = 0  # an all-zero row: s = 0, q = 0
            out.append(Sample(f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}", (x,)))
    return out


def check_quantize(out, args):
    q, s = out
    q_ref, s_ref = quantize_symmetric_reference(args[0])
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)  # one rounding, fully specified


def _int8_linear_samples() -> List[Sample]:
    out = []
    for dtype in FLOAT_DTYPES:
        for m, k, n in LINEAR_SHAPES:
            x = _randn(m, k, dtype=dtype, seed=m)
            wq, ws = quantize_symmetric_reference(_randn(n, k, seed=k))
            bias = _randn(n, seed=n) if m % 2 else None
            out.append(Sample(f"{str(dtype)[6:]}-{m}x{k}x{n}", (x, wq, ws, bias)))
    return out


def _linear_check(reference, what):
    def check(y, args):
        x, wq, ws, bias = args
        assert y.dtype == x.dtype and y.shape == (x.shape[0], wq.shape[0])
        ref64 = reference(x, wq, ws, bias, torch.float64)
        y_torch = reference(x, wq, ws, bias, torch.float32).to(x.dtype)  # fp32 math, rounded to x's dtype
        assert_within_torch_error(y, ref64, y_torch, what, 1e-5 * (1 + ref64.abs().max().item()))
    return check


def check_int8_gemm_s32(y, args):
    xq, wq = args
    assert torch.equal(y.cpu(), (xq.long() @ wq.long().T).int())


def _gemm_s32_samples() -> List[Sample]:
    g = torch.Generator().manual_seed(0)
    return [Sample(f"{m}x{k}x{n}", (torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8),
                                    torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)))
            for m, k, n in LINEAR_SHAPES]


# ---------------------------------------------------------------------------------------------- 2:4
SPARSE_SHAPES = [(1, 12, 3), (4, 36, 5), (17, 64, 9), (2, 1028, 24)]  # M, K (K % 8 == 4 included), N


def _sparse24_samples() -> List[Sample]:
    out = []
    for vdtype in FLOAT_DTYPES:
        for m, k, n in SPARSE_SHAPES:
            values, meta, _ = compressed_2_4_sample(_randn(n, k, dtype=vdtype, seed=k))
            bias = _randn(n, dtype=vdtype, seed=n) if m % 2 else None
            out.append(Sample(f"{str(vdtype)[6:]}-{m}x{k}x{n}", (_randn(m, k, dtype=vdtype, seed=m), values, meta, bias)))
    return out


def check_sparse24_linear(y, args):
    x, values, meta, bias = args
    ref64 = sparse24_linear_reference(x, values, meta, bias, dtype=torch.float64)
    y_torch = sparse24_linear_reference(x, values, meta, bias, dtype=torch.float32).to(x.dtype)
    assert y.dtype == x.dtype
    assert_within_torch_error(y, ref64, y_torch, "sparse24_linear", 1e-5 * (1 + ref64.abs().max().item()))


def _sparse24_int8_samples() -> List[Sample]:
    out = []
    for dtype in FLOAT_DTYPES:
        for m, k, n in SPARSE_SHAPES:
            _, meta, pruned = compressed_2_4_sample(_randn(n, k, seed=k))
            wq, ws = quantize_symmetric_reference(pruned)
            values = compressed_2_4_sample(wq)[0]
            bias = _randn(n, seed=n) if m % 2 else None
            out.append(Sample(f"{str(dtype)[6:]}-{m}x{k}x{n}", (_randn(m, k, dtype=dtype, seed=m), values, meta, ws, bias)))
    return out


def check_sparse24_int8_linear(y, args):
    x, values, meta, ws, bias = args
    ref64 = sparse24_linear_reference(x, values, meta, bias, w_scales=ws, dtype=torch.float64)
    y_torch = sparse24_linear_reference(x, values, meta, bias, w_scales=ws, dtype=torch.float32).to(x.dtype)
    assert y.dtype == x.dtype
    assert_within_torch_error(y, ref64, y_torch, "sparse24_int8_linear", 1e-5 * (1 + ref64.abs().max().item()))


# ------------------------------------------------------------------------------------------ the table
def _pack_weight(ns, args):
    x, wq, *rest = args
    return (x, ns.int8_pack_weight(wq), *rest)


@dataclass
class OpSamples:
    samples: Callable[[], List[Sample]]
    check: Callable  # check(outputs, sample args on the backend's device)
    op_args: Callable = lambda ns, args: args  # sample args -> the op's args, with `ns` the op namespace
    simt: bool = True  # the SIMT emulator build has this op
    # opcheck's tests: kd_loss_backward is not differentiable itself, kd_loss_fused has no autograd (loss.py wraps it)
    opcheck_utils: Tuple[str, ...] = ("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic")


OPS: Dict[str, OpSamples] = {
    "kd_loss_forward": OpSamples(_kd_samples, check_kd_loss_forward,
                                 op_args=lambda ns, args: (args[0].detach().requires_grad_(), *args[1:])),
    "kd_loss_backward": OpSamples(_kd_samples, check_kd_loss_backward, op_args=kd_backward_args,
                                  opcheck_utils=("test_schema", "test_autograd_registration", "test_faketensor")),
    "kd_loss_fused": OpSamples(_kd_samples, check_kd_loss_fused, op_args=lambda ns, args: (*args, GRAD_SCALE),
                               simt=False, opcheck_utils=("test_schema", "test_faketensor")),
    "kd_topk_forward": OpSamples(_topk_samples, check_kd_topk_forward,
                                 op_args=lambda ns, args: (args[0].detach().requires_grad_(), *args[1:])),
    "kd_topk_backward": OpSamples(_topk_samples, check_kd_topk_backward, op_args=kd_topk_backward_args,
                                  opcheck_utils=("test_schema", "test_autograd_registration", "test_faketensor")),
    "kd_topk_fused": OpSamples(_topk_samples, check_kd_topk_fused, op_args=lambda ns, args: (*args, GRAD_SCALE),
                               simt=False, opcheck_utils=("test_schema", "test_faketensor")),
    "quantize_per_token": OpSamples(_x_samples, check_quantize),
    "quantize_per_channel": OpSamples(lambda: [s for s in _x_samples() if s.args[0].dim() == 2], check_quantize),
    "int8_linear": OpSamples(_int8_linear_samples, _linear_check(int8_linear_reference, "int8_linear"),
                             op_args=_pack_weight),
    "int8_weight_only_linear": OpSamples(_int8_linear_samples,
                                         _linear_check(int8_weight_only_linear_reference, "int8_weight_only_linear"),
                                         op_args=_pack_weight),
    "int8_gemm_s32": OpSamples(_gemm_s32_samples, check_int8_gemm_s32),
    "sparse24_linear": OpSamples(_sparse24_samples, check_sparse24_linear),
    "sparse24_int8_linear": OpSamples(_sparse24_int8_samples, check_sparse24_int8_linear),
}

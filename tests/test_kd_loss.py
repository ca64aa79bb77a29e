"""Fused distillation loss (CPU): against the fp64 reference, gradients, edge cases, errors."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import KDLoss, kd_loss
from fastdistill.reference import kd_loss_reference, kd_reverse_kl_grad_reference
from bounds import assert_logits_gradient

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 7), (41, 1271), (2, 3, 32000), (4, 128256)]


def logits(shape, dtype, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def two_op_path(student, teacher, grad_out, reduction, labels=None, ignore_index=-100, **kw):
    """The loss and gradient through kd_loss_forward / kd_loss_backward (what torch.compile traces)."""
    args = (student, teacher, labels, kw.get("temperature", 1.0), kw.get("divergence", "forward_kl"), kw.get("beta", 0.5),
            ignore_index, kw.get("soft_weight", 1.0) * kw.get("temperature", 1.0) ** 2, kw.get("hard_weight", 0.0))
    rows, stats = torch.ops.fastdistill.kd_loss_forward(*args)
    x = rows.clone().requires_grad_()
    loss = fastdistill.loss._reduce(x, student.shape, labels, ignore_index, reduction)
    loss.backward(grad_out)
    grad = torch.ops.fastdistill.kd_loss_backward(x.grad.reshape(-1).contiguous(), student, teacher, labels, stats,
                                                  *args[3:])
    return loss, grad


def check_against_reference(student, teacher, grad_out=None, floor=1e-5, **kw):
    """Every entry point (training path, no-grad forward, two-op path) against the fp64 reference. The loss (fp32) within 2x the error of plain PyTorch in
    fp32 on the same (upcast) inputs, plus `floor` relative to the loss (the kernels' exp is a polynomial: 2e-9
    relative for fp32 students, 3e-6 for 16-bit ones). The gradient: fp32 within 2x plain fp32's error plus the
    floor; 16-bit per element within one unit of its dtype (eps |ref|, subnormal spacing included) on top of
    2x plain fp32's error and a few fp32 roundings of the largest gradient or grad_output."""
    s = student.clone().requires_grad_()
    out = kd_loss(s, teacher, **kw)
    s64 = student.double().requires_grad_()
    ref = kd_loss_reference(s64, teacher.double(), **kw)
    s_plain = student.detach().float().clone().requires_grad_()
    plain = kd_loss_reference(s_plain, teacher.float(), **kw)
    if grad_out is None:
        grad_out = torch.full_like(ref, 0.37) if ref.dim() == 0 else torch.randn_like(ref)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out.double())
    plain.backward(grad_out.to(plain.dtype))
    with torch.no_grad():
        no_grad = kd_loss(student, teacher, **kw)
    two_op_kw = {k: v for k, v in kw.items() if k != "reduction"}
    two_op_loss, two_op_grad = two_op_path(student, teacher, grad_out.float(), kw.get("reduction", "batchmean"),
                                           **two_op_kw)
    scale = 1.0 + ref.abs().max().item()
    for loss in (out, no_grad, two_op_loss):  # the training path, the no-grad forward, the two-op path
        assert loss.dtype == torch.float32 and loss.shape == ref.shape
        assert err(loss, ref) <= 2 * err(plain, ref) + floor * scale, (err(loss, ref), err(plain, ref))
    for grad in (s.grad, two_op_grad):
        assert grad.dtype == student.dtype and grad.shape == student.shape
        assert_logits_gradient(grad, s64.grad, s_plain.grad, grad_out, floor)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_fp64_reference(isa, divergence, reduction, dtype, shape):
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    check_against_reference(s, t, temperature=2.0, divergence=divergence, reduction=reduction, beta=0.3)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_isa_path(isa, divergence):
    for shape in [(3, 7), (5, 33), (2, 40000), (70, 301)]:  # tails, row splitting, many rows
        for dtype in DTYPES:
            s, t = logits(shape, dtype, seed=3), logits(shape, dtype, seed=4)
            labels = torch.randint(0, shape[-1], shape[:-1])
            labels.view(-1)[0] = -100
            check_against_reference(s, t, temperature=1.7, divergence=divergence, labels=labels, hard_weight=0.4,
                                    reduction="none")


def test_isa_paths_agree_closely():
    s, t = logits((9, 5000), torch.float32), logits((9, 5000), torch.float32, seed=5)
    outs = []
    for isa in fastdistill.isa.available_cpu_isas():
        with fastdistill.cpu_isa(isa):
            x = s.clone().requires_grad_()
            loss = kd_loss(x, t, divergence="jsd", reduction="none")
            loss.sum().backward()
            outs.append((loss, x.grad))
    for loss, grad in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, outs[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_forward_kl_equals_f_kl_div(reduction):
    s, t, T = logits((37, 999), torch.float64), logits((37, 999), torch.float64, seed=9), 3.0
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction=reduction) * T * T
    got = kd_loss(s.float(), t.float(), temperature=T, reduction=reduction)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_eager_baselines_match_the_reference():
    """The benchmark's eager reverse KL and JSD baselines compute the same loss as the fp64 reference."""
    from fastdistill.reference import kd_jsd_eager, kd_reverse_kl_eager
    s, t = logits((6, 333), torch.float64), logits((6, 333), torch.float64, seed=1)
    ref = kd_loss_reference(s, t, temperature=2.0, divergence="reverse_kl")
    torch.testing.assert_close(kd_reverse_kl_eager(s, t, 2.0), ref, rtol=1e-10, atol=1e-12)
    for beta in (0.3, 0.5):
        ref = kd_loss_reference(s, t, temperature=2.0, divergence="jsd", beta=beta)
        torch.testing.assert_close(kd_jsd_eager(s, t, 2.0, beta), ref, rtol=1e-10, atol=1e-12)


def test_jsd_beta_endpoints_are_exactly_kl():
    s, t = logits((6, 300), torch.float32), logits((6, 300), torch.float32, seed=3)
    for beta, same in [(0.0, "forward_kl"), (1.0, "reverse_kl")]:
        a = kd_loss(s, t, divergence="jsd", beta=beta, reduction="none")
        b = kd_loss(s, t, divergence=same, reduction="none")
        assert torch.equal(a, b)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_hard_labels_and_ignore_index(divergence):
    s, t = logits((4, 6, 501), torch.float32), logits((4, 6, 501), torch.float32, seed=7)
    labels = torch.randint(0, 501, (4, 6))
    labels[0, :3] = -1
    for T in (1.0, 2.5):  # T == 1 shares the softmax with the hard term
        check_against_reference(s, t, temperature=T, divergence=divergence, labels=labels, ignore_index=-1,
                                soft_weight=0.7, hard_weight=0.3)


def test_all_rows_ignored_gives_zero_not_nan():
    s, t = logits((3, 10), torch.float32).requires_grad_(), logits((3, 10), torch.float32)
    labels = torch.full((3,), -100)
    for reduction in ("batchmean", "sum", "mean"):
        loss = kd_loss(s, t, labels=labels, hard_weight=1.0, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(s.grad == 0)
        s.grad = None


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_neg_inf(divergence):
    s, t = logits((8, 257), torch.float32), logits((8, 257), torch.float32, seed=11)
    mask = torch.rand(8, 257, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[:, 0] = False  # every row keeps something
    s = s.masked_fill(mask, float("-inf"))
    t = t.masked_fill(mask, float("-inf"))
    check_against_reference(s, t, temperature=1.3, divergence=divergence, reduction="sum")
    x = s.clone().requires_grad_()
    loss = kd_loss(x, t, divergence=divergence)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad)) and torch.all(x.grad[mask] == 0)


@pytest.mark.parametrize("training", [False, True])
def test_denormal_flushing_is_scoped_to_the_kernels(training):
    """The kernels flush denormals (a masked vocabulary would cost a microcode assist per element) and
    restore the caller's floating-point state: denormals still exist in the caller's thread afterwards."""
    s, t = logits((64, 1000), torch.float32), logits((64, 1000), torch.float32, seed=3)
    s[:, 700:], t[:, 700:] = -1e4, -1e4  # every exponential of these columns underflows
    x = s.clone().requires_grad_(training)
    loss = kd_loss(x, t, temperature=0.5)
    if training:
        loss.backward()
        assert torch.all(x.grad[:, 700:] == 0)
    check_against_reference(s, t, temperature=0.5)
    tiny = torch.tensor([1e-20]) * torch.tensor([1e-20])  # 1e-40 is a float32 denormal
    assert tiny.item() != 0.0


def test_teacher_masked_only_gives_finite_forward_kl():
    s, t = logits((4, 64), torch.float32), logits((4, 64), torch.float32, seed=2)
    t[:, 10:20] = float("-inf")  # p = 0 there: forward KL ignores those columns
    check_against_reference(s, t, divergence="forward_kl", reduction="sum")


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 7.0, 100.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_magnitudes_and_temperatures(temperature, divergence):
    s, t = logits((5, 1000), torch.float32, scale=1e4), logits((5, 1000), torch.float32, scale=1e4, seed=8)
    t[:, :5] = s[:, :5]  # overlapping supports keep the divergences finite at tiny T
    check_against_reference(s, t, temperature=temperature, divergence=divergence, reduction="sum", floor=2e-5)


def test_non_contiguous_inputs():
    base_s, base_t = logits((3, 9, 700), torch.float32), logits((3, 9, 700), torch.float32, seed=4)
    views = [
        (base_s[:, :-1, :], base_t[:, 1:, :]),                  # sliced sequence dim (two-level rows)
        (base_s.transpose(0, 1), base_t.transpose(0, 1)),       # permuted leading dims
        (base_s[::2, ::3, :], base_t[::2, ::3, :]),             # strided leading dims
        (base_s[..., ::2], base_t[..., ::2]),                   # strided vocab (copied)
    ]
    for s, t in views:
        assert not s.is_contiguous()
        check_against_reference(s, t, temperature=2.0, reduction="none")


def test_mixed_dtypes():
    s, t = logits((7, 3001), torch.bfloat16), logits((7, 3001), torch.float32, seed=3)
    check_against_reference(s, t, temperature=2.0, divergence="jsd", floor=1e-3)
    s16 = logits((7, 3001), torch.float16)
    check_against_reference(s16, t.to(torch.bfloat16), temperature=2.0, floor=1e-3)


def test_only_student_gets_gradient():
    s, t = logits((3, 50), torch.float32).requires_grad_(), logits((3, 50), torch.float32).requires_grad_()
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_kdloss_module_matches_function():
    s, t = logits((4, 3, 100), torch.float32), logits((4, 3, 100), torch.float32, seed=1)
    labels = torch.randint(0, 100, (4, 3))
    kw = dict(temperature=2.0, divergence="reverse_kl", reduction="sum", soft_weight=0.5, hard_weight=0.5)
    module = KDLoss(**kw)
    assert torch.equal(module(s, t, labels), kd_loss(s, t, labels=labels, **kw))
    assert "reverse_kl" in repr(module)


def test_double_backward_is_a_clear_error():
    s, t = logits((3, 20), torch.float32).requires_grad_(), logits((3, 20), torch.float32)
    (g,) = torch.autograd.grad(kd_loss(s, t), s, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()




# (temperature, hard_weight): KL takes the cached path unless a separate hard softmax is needed.
FUSED_VARIANTS = [(2.0, 0.3), (2.0, 0.0), (1.0, 0.3)]


@pytest.mark.parametrize("variant", FUSED_VARIANTS, ids=lambda v: f"T{v[0]}-hard{v[1]}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_training_path_equals_two_op_path(isa, dtype, divergence, reduction, variant):
    """Eager CPU training writes the gradient in the forward call; with grad_output = 1 it is handed over
    unchanged and equals the separate backward's (bit for bit where both compute it the same way; the
    KL cache paths round differently by a few ulps); other grad_outputs scale it in place."""
    temperature, hard = variant
    s, t = logits((2, 5, 4501), dtype, seed=1), logits((2, 5, 4501), dtype, seed=2)
    for x in (s, t):  # a masked vocabulary (shared, so every divergence stays finite)
        x[0, 2, :700] = float("-inf")
        x[1, 3, 4000:] = float("-inf")
    labels = torch.randint(0, 4501, (2, 5))
    labels[0, 1] = -100
    kw = dict(temperature=temperature, divergence=divergence, soft_weight=0.8, hard_weight=hard)
    exp_cache = divergence in ("forward_kl", "reverse_kl") and (hard == 0.0 or temperature == 1.0)
    low = dict(rtol=1e-2, atol=1e-6)
    for scale in (1.0, 0.25, 0.37):  # 0.25: scaled in place exactly; 0.37: bf16/fp16 recompute
        x = s.clone().requires_grad_()
        loss = kd_loss(x, t, labels=labels, reduction=reduction, beta=0.3, **kw)
        assert loss.grad_fn.name().endswith("_FusedKDLossBackward")
        grad_out = torch.full_like(loss, scale)
        loss.backward(grad_out)
        ref_loss, ref_grad = two_op_path(s, t, grad_out, reduction, labels=labels, beta=0.3, **kw)
        assert torch.equal(loss, ref_loss)
        if scale != 0.37 and not exp_cache:
            assert torch.equal(x.grad, ref_grad)
        else:
            tol = dict(rtol=1e-5, atol=1e-9 if reduction == "mean" else 1e-8) if dtype == torch.float32 else low
            torch.testing.assert_close(x.grad, ref_grad, **tol)


def peaked_logits(shape):
    """|logits| / T ~ 1e4 at T = 2: softmax(student / T) is one-hot in float32."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g) * 9000, torch.randn(shape, generator=g) * 9000


def peaked_truth(s, t, grad_out, **kw):
    """Loss and gradient in float64 (reverse KL's gradient centred: autograd cancels there, even in float64)."""
    s64 = s.double().requires_grad_()
    loss = kd_loss_reference(s64, t.double(), **kw)
    loss.backward(torch.tensor(grad_out, dtype=torch.float64))
    if kw["divergence"] == "reverse_kl":
        return loss.detach(), grad_out * kd_reverse_kl_grad_reference(s, t, kw["temperature"])
    return loss.detach(), s64.grad


def test_centred_reverse_kl_reference_is_autograds_where_nothing_cancels():
    s, t = logits((3, 50), torch.float64), logits((3, 50), torch.float64, seed=5)
    x = s.clone().requires_grad_()
    kd_loss_reference(x, t, temperature=1.5, divergence="reverse_kl", reduction="sum").backward()
    torch.testing.assert_close(kd_reverse_kl_grad_reference(s, t, 1.5), x.grad, rtol=1e-12, atol=1e-14)


# 6x5000: whole rows of three blocks; 2x40000: few long rows, split into column chunks and merged.
@pytest.mark.parametrize("shape", [(6, 5000), (2, 40000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", ["fused", "two_op"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_peaked_softmax_loses_nothing_to_cancellation(isa, divergence, path, shape):
    """Loss and gradient within 2x plain float32 PyTorch's error, with no floor, where one column holds all of
    q: reverse KL's q (log q/p - KL) used to subtract two rounded ~1e4 numbers (1e-3 off at the argmax)."""
    s, t = peaked_logits(shape)
    kw = dict(temperature=2.0, divergence=divergence, reduction="sum", beta=0.3)
    ref_loss, ref_grad = peaked_truth(s, t, 0.37, **kw)
    plain = s.clone().requires_grad_()
    plain_loss = kd_loss_reference(plain, t, **kw)
    plain_loss.backward(torch.tensor(0.37))
    if path == "fused":
        x = s.clone().requires_grad_()
        loss = kd_loss(x, t, **kw)
        loss.backward(torch.tensor(0.37))
        grad = x.grad
    else:
        loss, grad = two_op_path(s, t, torch.tensor(0.37), "sum", temperature=2.0, divergence=divergence, beta=0.3)
    assert err(loss, ref_loss) <= 2 * err(plain_loss, ref_loss), (err(loss, ref_loss), err(plain_loss, ref_loss))
    assert err(grad, ref_grad) <= 2 * err(plain.grad, ref_grad), (err(grad, ref_grad), err(plain.grad, ref_grad))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_exp_cache_path_every_isa(isa, divergence):
    """The training paths' caches (KL: the statistics pass's exponentials, and for reverse KL its log
    ratios; JSD: the second pass's q and log-ratio): several blocks of 2048 columns, tails, masked
    blocks (a block that is all -inf while the running max is still -inf), T = 1 hard labels."""
    for shape in [(3, 7), (4, 5000), (2, 6145)]:
        for dtype in DTYPES:
            s, t = logits(shape, dtype, seed=3), logits(shape, dtype, seed=4)
            for x in (s, t):  # masked vocabulary, shared by student and teacher
                x[0, : min(2100, shape[-1] - 1)] = float("-inf")
                x[-1, : min(2048, shape[-1] - 1)] = float("-inf")
            labels = torch.full(shape[:-1], shape[-1] - 1)  # the last column is never masked
            labels[1] = -100
            # Labels inside a pair of vectors (bf16 pairs hold the even and the odd columns apart): the
            # hard term's -hard must land on the right lane.
            if shape[-1] > 2111:
                labels[0] = 2111
            if shape[0] > 3:  # row 2 is unmasked
                labels[2] = 45
            # grad_output a power of 2: bf16 / fp16 gradients are the cached path's, scaled in place, not
            # recomputed by the backward op.
            check_against_reference(s, t, grad_out=torch.tensor(0.5, dtype=torch.float64), temperature=2.0,
                                    divergence=divergence, reduction="sum")
            check_against_reference(s, t, grad_out=torch.full(shape[:-1], 0.25, dtype=torch.float64),
                                    temperature=1.0, divergence=divergence, labels=labels, hard_weight=0.4,
                                    reduction="none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_path_second_backward_recomputes(reduction):
    """retain_graph=True: the precomputed gradient is handed over once, later backwards recompute it."""
    s, t = logits((6, 700), torch.float32), logits((6, 700), torch.float32, seed=3)
    labels = torch.tensor([1, -100, 3, 4, 5, 6])
    x = s.clone().requires_grad_()
    loss = kd_loss(x, t, temperature=2.0, labels=labels, hard_weight=0.5, reduction=reduction)
    ones = torch.ones_like(loss)
    loss.backward(ones, retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward(ones * 0.5, retain_graph=True)
    torch.testing.assert_close(x.grad, first * 0.5, rtol=1e-6, atol=1e-9)
    x.grad = None
    loss.backward(ones)
    assert torch.equal(x.grad, first)


def test_forward_without_grad_uses_the_two_op_path():
    s, t = logits((4, 100), torch.float32), logits((4, 100), torch.float32, seed=1)
    assert kd_loss(s, t).grad_fn is None
    x = s.clone().requires_grad_()
    with torch.no_grad():
        assert torch.equal(kd_loss(x, t), kd_loss(s, t))
    assert kd_loss(x, t).grad_fn.name().endswith("_FusedKDLossBackward")


def test_empty_batch():
    s, t = torch.empty(0, 10, requires_grad=True), torch.empty(0, 10)
    loss = kd_loss(s, t)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.shape == (0, 10)


def test_opcheck():
    s, t = logits((5, 37), torch.float32), logits((5, 37), torch.bfloat16, seed=1)
    labels = torch.tensor([1, 2, -100, 4, 36])
    s.requires_grad_()
    fwd = torch.ops.fastdistill.kd_loss_forward.default
    for div in DIVERGENCES:
        args = (s, t, labels, 2.0, div, 0.4, -100, 4.0, 0.5)
        torch.library.opcheck(fwd, args)
        _, stats = fwd(*args)
        # The backward op is not itself differentiable (double backward raises), so the checks
        # that differentiate through it are left out for it.
        torch.library.opcheck(torch.ops.fastdistill.kd_loss_backward.default,
                              (torch.randn(5), s.detach(), t, labels, stats, 2.0, div, 0.4, -100, 4.0, 0.5),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(fwd, (s, t, None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0))
    fused = torch.ops.fastdistill.kd_loss_fused.default
    for grad_scale in (1.0, 0.125):
        # No autograd of its own: fastdistill.loss wraps it in an autograd.Function.
        torch.library.opcheck(fused, (s.detach(), t, labels, 2.0, "jsd", 0.4, -100, 4.0, 0.5, grad_scale),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    s, t = logits((6, 500), torch.float32), logits((6, 500), torch.float32, seed=2)
    labels = torch.randint(0, 500, (6,))

    def step(x, y, lab):
        return kd_loss(x, y, temperature=2.0, divergence="jsd", labels=lab, hard_weight=0.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    a, b = compiled(x1, t, labels), step(x2, t, labels)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(x1.grad, x2.grad)


def test_torch_compile_inductor():
    s, t = logits((4, 300), torch.float32), logits((4, 300), torch.float32, seed=2)
    f = torch.compile(lambda x, y: kd_loss(x, y, temperature=3.0) * 2, fullgraph=True)
    x = s.clone().requires_grad_()
    out = f(x, t)
    out.backward()
    torch.testing.assert_close(out, kd_loss(s, t, temperature=3.0) * 2)


BAD_INPUTS = [
    (dict(s=(4, 10), t=(4, 11)), "student and teacher must have the same shape, got \\[4, 10\\] and \\[4, 11\\]"),
    (dict(sd=torch.int64), "student logits must be float32, bfloat16 or float16, got Long"),
    (dict(td=torch.float64), "teacher logits must be float32, bfloat16 or float16, got Double"),
    (dict(temperature=0.0), "temperature must be a finite number > 0, got 0"),
    (dict(temperature=-2.0), "temperature must be a finite number > 0"),
    (dict(divergence="kl"), "divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got 'kl'"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(divergence="jsd", beta=1.5), "beta must be in \\[0, 1\\], got 1.5"),
    (dict(beta=-0.1), "beta must be in \\[0, 1\\]"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels must have the logits' leading shape \\[4\\], got \\[5\\]"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), "labels must be int64"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), "labels must be in \\[0, 10\\) or ignore_index \\(-100\\), got 10 at row 2"),
    (dict(labels=torch.tensor([0, -5, 1, 2])), "got -5 at row 1"),
    (dict(hard_weight=1.0), "hard_weight=1 needs labels"),
    (dict(s=(4, 0), t=(4, 0)), "vocabulary \\(last\\) dim must be >= 1"),
]


@pytest.mark.parametrize("case,match", BAD_INPUTS, ids=[m.split(",")[0][:40] for _, m in BAD_INPUTS])
def test_bad_inputs(case, match):
    case = dict(case)
    s = torch.randn(*case.pop("s", (4, 10))).to(case.pop("sd", torch.float32))
    t = torch.randn(*case.pop("t", (4, 10))).to(case.pop("td", torch.float32))
    with pytest.raises((RuntimeError, ValueError), match=r"^fastdistill\.kd_loss: (.*)?" + match):
        kd_loss(s, t, **case)


def test_different_devices_error():
    s = torch.randn(2, 3)
    t = torch.randn(2, 3, device="meta")
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.fastdistill.kd_loss_forward(s, t, None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)


def test_env_var_selects_isa_and_rejects_nonsense():
    code = "import torch, fastdistill; fastdistill.kd_loss(torch.randn(2, 5), torch.randn(2, 5)); " \
           "print(fastdistill.isa.active_cpu_isa())"
    env = dict(os.environ, FASTDISTILL_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["FASTDISTILL_CPU_ISA"] = "sse9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTDISTILL_CPU_ISA must be one of auto, amx, avx512bf16, avx512, avx2, scalar; got 'sse9'" in out.stderr


def test_peak_memory_beyond_inputs_and_gradient():
    """No vocab-sized temporaries: the extra high-water mark of a fwd+bwd step stays within 5% of one
    logits tensor, while the same probe sees the eager formula's several logits-sized temporaries."""
    from fastdistill.bench.kd import peak_memory

    ours, eager = peak_memory(512, 32000, "float32", "fastdistill"), peak_memory(512, 32000, "float32", "eager")
    assert ours <= 0.05, ours
    assert eager >= 2.0, eager


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 530), (torch.bfloat16, 1060)])
def test_large_gradient_streamed_past_cache_is_exact(dtype, rows):
    """Gradients of >= 64 MB are written with non-temporal stores; each row must come out exactly as
    it does from a small call (rows are independent), on every ISA path."""
    s, t = logits((rows, 32000), dtype, seed=1), logits((rows, 32000), dtype, seed=2)
    for isa in fastdistill.isa.available_cpu_isas():
        with fastdistill.cpu_isa(isa):
            x = s.clone().requires_grad_()
            kd_loss(x, t, temperature=2.0, reduction="sum").backward()
            few = s[-3:].clone().requires_grad_()
            kd_loss(few, t[-3:], temperature=2.0, reduction="sum").backward()
            assert torch.equal(x.grad[-3:], few.grad)


def test_fused_op_rejects_nonfinite_grad_scale():
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.kd_loss_fused: grad_scale must be finite, got inf"):
        torch.ops.fastdistill.kd_loss_fused(s, t, None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0, float("inf"))

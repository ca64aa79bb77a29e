"""The lm_head fused into the distillation loss: against the fp64 unfused formula, chunking, gradients, errors,
opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import FusedLinearKDLoss, fused_linear_kd_loss
from fastdistill.fused_linear import _backward_op, _forward_op, default_chunk_size
from fastdistill.reference import kd_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
TEACHER_FORMS = ["hidden", "hidden_bias", "logits"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def problem(rows, hidden, vocab, dtype=torch.float32, teacher="hidden", bias=False, teacher_hidden=None, seed=0):
    """Student (h [rows, H], W [V, H], b) and the teacher in one form, with logits of a few units."""
    ht = teacher_hidden or hidden + 7  # the teacher's hidden size differs from the student's
    h, w = randn((rows, hidden), dtype, seed=seed), randn((vocab, hidden), dtype, 2.0 / max(hidden, 1) ** 0.5, seed + 1)
    b = randn((vocab,), dtype, seed=seed + 2) if bias else None
    if teacher == "logits":
        t = dict(teacher_logits=randn((rows, vocab), dtype, 2.0, seed + 3))
    else:
        t = dict(teacher_hidden=randn((rows, ht), dtype, seed=seed + 4),
                 teacher_weight=randn((vocab, ht), dtype, 2.0 / ht ** 0.5, seed + 5))
        if teacher == "hidden_bias":
            t["teacher_bias"] = randn((vocab,), dtype, seed=seed + 6)
    return h, w, b, t


def teacher_logits_in(t, dtype):
    """The teacher's logits computed in `dtype` (the unfused formula)."""
    if "teacher_logits" in t:
        return t["teacher_logits"].to(dtype)
    bias = t.get("teacher_bias")
    bias = None if bias is None else bias.to(dtype)
    return F.linear(t["teacher_hidden"].to(dtype), t["teacher_weight"].to(dtype), bias)


def unfused(h, w, b, t, dtype, **kw):
    """kd_loss's definition on F.linear's logits: the GEMMs in `dtype` (PyTorch's own precision there), the loss
    formula in max(dtype, fp32). Returns the loss and the leaves (hidden, weight, bias) that the backward fills."""
    leaves = [x.detach().to(dtype).requires_grad_() if x is not None else None for x in (h, w, b)]
    logits = F.linear(*leaves)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return kd_loss_reference(logits.to(loss_dtype), teacher_logits_in(t, dtype).to(loss_dtype), **kw), leaves


def check_against_reference(h, w, b, t, grad_out=None, floor=1e-5, chunk_size=None, **kw):
    """The loss and every gradient against the fp64 unfused formula: within 2x the error of PyTorch's own unfused
    computation in the inputs' dtype (F.linear in that dtype, the loss in fp32), plus `floor` relative to the
    largest value (the kd kernels' exp is a polynomial, 2e-9 relative on fp32 logits)."""
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    out = fused_linear_kd_loss(leaves[0], leaves[1], student_bias=leaves[2], chunk_size=chunk_size, **t, **kw)
    ref, ref_leaves = unfused(h, w, b, t, torch.float64, **kw)
    plain, plain_leaves = unfused(h, w, b, t, h.dtype, **kw)
    if grad_out is None:
        grad_out = torch.full_like(ref, 0.37) if ref.dim() == 0 else randn(ref.shape, torch.float64, seed=9)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    plain.backward(grad_out.to(plain.dtype))
    with torch.no_grad():
        no_grad = fused_linear_kd_loss(h, w, student_bias=b, chunk_size=chunk_size, **t, **kw)
    scale = 1.0 + ref.abs().max().item() if ref.numel() else 1.0
    for loss in (out, no_grad):
        assert loss.dtype == torch.float32 and loss.shape == ref.shape
        assert err(loss, ref) <= 2 * err(plain, ref) + floor * scale, (err(loss, ref), err(plain, ref))
    for x, ours, ref_x, plain_x in zip((h, w, b), leaves, ref_leaves, plain_leaves):
        if x is None:
            continue
        g, g64 = ours.grad, ref_x.grad
        assert g.dtype == x.dtype and g.shape == x.shape
        gscale = 1.0 + (g64.abs().max().item() if g64.numel() else 0.0)
        assert err(g, g64) <= 2 * err(plain_x.grad, g64) + floor * gscale, (err(g, g64), err(plain_x.grad, g64))
    return out


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("teacher", TEACHER_FORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_fp64_reference(divergence, reduction, teacher, bias):
    h, w, b, t = problem(37, 33, 101, teacher=teacher, bias=bias)
    labels = torch.randint(0, 101, (37,))
    labels[[0, 5]] = -100
    check_against_reference(h, w, b, t, chunk_size=8, temperature=2.0, divergence=divergence, reduction=reduction,
                            beta=0.3, labels=labels, hard_weight=0.3, soft_weight=0.8)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mm"])
@pytest.mark.parametrize("teacher", TEACHER_FORMS)
def test_both_cpu_gemm_routes(monkeypatch, onednn, teacher):
    """The head's GEMMs through oneDNN (the CPU default) and through torch.mm (where torch lacks oneDNN)."""
    import fastdistill.fused_linear as fl

    if onednn and not torch.backends.mkldnn.is_available():
        pytest.fail("this torch build has no oneDNN: the CPU default route cannot be tested")
    monkeypatch.setattr(fl, "_ONEDNN", onednn)
    h, w, b, t = problem(29, 40, 77, teacher=teacher, bias=True)
    check_against_reference(h, w, b, t, chunk_size=8, temperature=2.0, divergence="jsd", reduction="batchmean",
                            beta=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision_inputs(divergence, reduction, dtype):
    """bf16 / fp16 hidden states and heads: the logits are computed in fp32 (never rounded to 16 bits before the
    softmax), the gradients come back in the inputs' dtype."""
    h, w, b, t = problem(45, 64, 1000, dtype, teacher="hidden_bias", bias=True)
    check_against_reference(h, w, b, t, chunk_size=16, temperature=2.0, divergence=divergence, reduction=reduction)


def test_low_precision_beats_rounded_logits():
    """For bf16 inputs the fused loss is as close to the fp64 truth as the fp32 pipeline on the same inputs (up to
    a few fp32 ulps of the loss: the chunked sums round differently), and an order of magnitude closer than F.linear
    in bf16 (rounded logits)."""
    h, w, b, t = problem(64, 256, 4000, torch.bfloat16)
    ours = fused_linear_kd_loss(h, w, **t, temperature=1.0)
    ref, _ = unfused(h, w, b, t, torch.float64)
    fp32, _ = unfused(h, w, b, t, torch.float32)
    plain, _ = unfused(h, w, b, t, torch.bfloat16)
    assert err(ours, ref) <= 2 * err(fp32, ref) + 16 * torch.finfo(torch.float32).eps * ref.abs().item()
    assert err(ours, ref) * 10 < err(plain, ref), (err(ours, ref), err(plain, ref))


@pytest.mark.parametrize("vocab", [1, 3, 33, 101, 1000])
@pytest.mark.parametrize("hidden", [1, 3, 33, 101, 1000])
def test_awkward_sizes(hidden, vocab):
    h, w, b, t = problem(7, hidden, vocab, bias=True, teacher_hidden=3)
    for chunk in (1, 3):  # rows not a multiple of the chunk
        check_against_reference(h, w, b, t, chunk_size=chunk, temperature=1.5, divergence="jsd")


def test_large_vocabulary():
    h, w, b, t = problem(5, 33, 32000, teacher="logits")
    check_against_reference(h, w, b, t, chunk_size=2, temperature=2.0, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64, None])
def test_chunk_sizes_agree(chunk_size):
    """Every chunking gives the reference's result (rows independent; the weight gradient sums over chunks)."""
    h, w, b, t = problem(23, 40, 300, bias=True)
    check_against_reference(h, w, b, t, chunk_size=chunk_size, temperature=2.0, divergence="reverse_kl")


def test_leading_dims_and_labels():
    h, w, b, t = problem(12, 16, 50, teacher="logits")
    labels = torch.randint(0, 50, (12,))
    labels[3] = -7
    kw = dict(temperature=2.0, labels=labels.view(3, 4), ignore_index=-7, hard_weight=0.5, reduction="none")
    t3 = {"teacher_logits": t["teacher_logits"].view(3, 4, 50)}
    out = fused_linear_kd_loss(h.view(3, 4, 16), w, **t3, **kw, chunk_size=5)
    ref = fused_linear_kd_loss(h, w, **t, **dict(kw, labels=labels), chunk_size=5)
    assert out.shape == (3, 4) and torch.equal(out.view(-1), ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction):
    h, w, b, t = problem(9, 8, 20, bias=True)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = fused_linear_kd_loss(leaves[0], leaves[1], student_bias=leaves[2], **t, labels=torch.full((9,), -100),
                                hard_weight=1.0, reduction=reduction, chunk_size=4)
    assert torch.all(loss == 0)
    loss.sum().backward()
    for x in leaves:
        assert torch.all(x.grad == 0)


def test_empty_batch():
    h, w, b, t = problem(0, 8, 20)
    x = h.clone().requires_grad_()
    wx = w.clone().requires_grad_()
    loss = fused_linear_kd_loss(x, wx, **t)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, 8) and torch.all(wx.grad == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_isa_path(isa, divergence):
    for dtype in (torch.float32, torch.bfloat16):
        h, w, b, t = problem(21, 48, 3001, dtype, bias=True)
        labels = torch.randint(0, 3001, (21,))
        labels[2] = -100
        check_against_reference(h, w, b, t, chunk_size=8, temperature=1.7, divergence=divergence, labels=labels,
                                hard_weight=0.4, reduction="batchmean")


def test_gradients_only_where_required_each_in_its_dtype():
    h, w, b, t = problem(10, 12, 30, bias=True)
    hb = h.to(torch.bfloat16).requires_grad_()
    wf = w.clone().requires_grad_()
    bh = b.to(torch.float16)  # no grad wanted
    th = t["teacher_hidden"].clone().requires_grad_()
    tw = t["teacher_weight"].clone().requires_grad_()
    fused_linear_kd_loss(hb, wf, th, tw, student_bias=bh, temperature=2.0).backward()
    assert hb.grad.dtype == torch.bfloat16 and wf.grad.dtype == torch.float32
    assert th.grad is None and tw.grad is None
    ref, (rh, rw, _) = unfused(hb.detach(), wf.detach(), bh, {"teacher_hidden": th.detach(),
                                                               "teacher_weight": tw.detach()}, torch.float64,
                               temperature=2.0)
    ref.backward()
    assert err(wf.grad, rw.grad) <= 1e-2 * rw.grad.abs().max().item()
    only_w = w.clone().requires_grad_()
    fused_linear_kd_loss(h, only_w, **t).backward()
    assert only_w.grad is not None


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_backward_recomputes(reduction):
    """retain_graph=True: the forward's gradients are handed over once; later backwards recompute them."""
    h, w, b, t = problem(11, 16, 70, bias=True)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = fused_linear_kd_loss(leaves[0], leaves[1], student_bias=leaves[2], **t, temperature=2.0,
                                reduction=reduction, chunk_size=4)
    ones = torch.ones_like(loss)
    loss.backward(ones, retain_graph=True)
    first = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    loss.backward(ones * 0.5)
    for x, g in zip(leaves, first):
        torch.testing.assert_close(x.grad, g * 0.5, rtol=1e-5, atol=1e-7)


def test_module_matches_function():
    h, w, b, t = problem(6, 10, 40, teacher="hidden_bias", bias=True)
    labels = torch.randint(0, 40, (6,))
    kw = dict(temperature=2.0, divergence="jsd", beta=0.2, reduction="sum", hard_weight=0.5, chunk_size=4)
    module = FusedLinearKDLoss(**kw)
    got = module(h, w, t["teacher_hidden"], t["teacher_weight"], teacher_bias=t["teacher_bias"], labels=labels,
                 student_bias=b)
    assert torch.equal(got, fused_linear_kd_loss(h, w, **t, student_bias=b, labels=labels, **kw))
    assert "jsd" in repr(module)


def test_equals_kd_loss_on_the_linear_outputs():
    """The documented equivalence, against the library's own unfused path (same kernels, fp32)."""
    h, w, b, t = problem(19, 24, 333, teacher="hidden_bias", bias=True)
    kw = dict(temperature=3.0, divergence="reverse_kl", scale_by_t2=False, soft_weight=0.6)
    ours = fused_linear_kd_loss(h, w, **t, student_bias=b, chunk_size=7, **kw)
    theirs = fastdistill.kd_loss(F.linear(h, w, b), teacher_logits_in(t, torch.float32), **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_default_chunk_size_rule():
    assert default_chunk_size(32000, 1024) == 48  # 20 MiB of fp32 student + teacher logits and their gradient
    assert default_chunk_size(128256, 4096) == 16
    assert default_chunk_size(100, 16) == 1024
    for vocab, hidden in [(32000, 1024), (50000, 512), (2000, 64)]:
        c = default_chunk_size(vocab, hidden)
        assert c % 8 == 0 and 4 * c * (3 * vocab + 2 * hidden) <= 20 << 20


def test_double_backward_is_a_clear_error():
    h, w, b, t = problem(4, 6, 20)
    x = h.clone().requires_grad_()
    (g,) = torch.autograd.grad(fused_linear_kd_loss(x, w, **t, reduction="none").sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="fused_linear_kd_loss: double backward"):
        g.sum().backward()


def test_opcheck():
    h, w, b, t = problem(9, 12, 37, bias=True)
    labels = torch.tensor([1, 2, -100, 4, 36, 0, 5, 6, 7])
    x, wx, bx = (v.clone().requires_grad_() for v in (h, w, b))
    params = (2.0, "jsd", 0.4, -100, 4.0, 0.5, "bucket")
    lp, idx = torch.log_softmax(randn((9, 37)), -1).topk(5, -1)
    for teacher in ((t["teacher_hidden"], t["teacher_weight"], None, None, None, None),
                    (None, None, None, randn((9, 37)), None, None), (None, None, None, None, idx, lp)):
        for reduction, precompute in [("batchmean", (True, True, True)), ("sum", (True, False, True)),
                                      ("none", (False, False, False)), ("mean", (False, False, False))]:
            args = (x, wx, bx, *teacher, labels, *params, reduction, 4, *precompute)
            torch.library.opcheck(_forward_op, args)
            _, stats, *_ = _forward_op(*args)
            # The backward op is not differentiable itself (double backward raises): the checks that differentiate
            # through it are left out for it.
            torch.library.opcheck(_backward_op, (randn(9), h, w, b, *teacher, labels, stats, *params, 4, True, True,
                                                 True),
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    h, w, b, t = problem(10, 16, 90, teacher="hidden_bias", bias=True)
    labels = torch.randint(0, 90, (10,))

    def step(x, wx, bx, th, tw, tb, lab):
        loss = fused_linear_kd_loss(x, wx, th, tw, teacher_bias=tb, student_bias=bx, labels=lab, temperature=2.0,
                                    divergence="jsd", hard_weight=0.5, reduction=reduction, chunk_size=4)
        return loss.sum() * 3

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    a_leaves = [v.clone().requires_grad_() for v in (h, w, b)]
    e_leaves = [v.clone().requires_grad_() for v in (h, w, b)]
    teacher = (t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"])
    a, e = compiled(*a_leaves, *teacher, labels), step(*e_leaves, *teacher, labels)
    a.backward()
    e.backward()
    torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    for x, y in zip(a_leaves, e_leaves):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


BAD_INPUTS = [
    (dict(w=(20, 9)), "the hidden size of student_hidden \\(8\\) does not match student_weight \\[20, 9\\]"),
    (dict(teacher="none"), "give the teacher in exactly one form.*\\(got neither\\)"),
    (dict(teacher="both"), "give the teacher in exactly one form.*\\(got both\\)"),
    (dict(teacher="hidden_only"), "teacher_hidden and teacher_weight go together"),
    (dict(tw=(21, 5)), "the teacher's vocabulary \\(21\\) differs from the student's \\(20\\)"),
    (dict(teacher="logits", tl=(4, 19)), "the teacher's vocabulary \\(19\\) differs from the student's \\(20\\)"),
    (dict(tw=(20, 6)), "the hidden size of teacher_hidden \\[4, 5\\] does not match teacher_weight \\[20, 6\\]"),
    (dict(th=(3, 5)), "teacher_hidden must have the student's leading shape \\[4\\], got \\[3\\]"),
    (dict(teacher="logits", tl=(5, 20)), "teacher_logits must have the student's leading shape \\[4\\], got \\[5\\]"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels must have the hidden states' leading shape \\[4\\]"),
    (dict(student_bias=torch.zeros(19)), "student_bias must be \\[V\\] = \\[20\\], got \\[19\\]"),
    (dict(chunk_size=0), "chunk_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("case,match", BAD_INPUTS, ids=[m.split(" ")[1][:30] + str(i) for i, (_, m) in
                                                        enumerate(BAD_INPUTS)])
def test_bad_inputs(case, match):
    case = dict(case)
    h, w = torch.randn(4, 8), torch.randn(*case.pop("w", (20, 8)))
    th, tw = torch.randn(*case.pop("th", (4, 5))), torch.randn(*case.pop("tw", (20, 5)))
    tl = torch.randn(*case.pop("tl", (4, 20)))
    teacher = {"hidden": dict(teacher_hidden=th, teacher_weight=tw), "logits": dict(teacher_logits=tl),
               "none": {}, "both": dict(teacher_hidden=th, teacher_weight=tw, teacher_logits=tl),
               "hidden_only": dict(teacher_hidden=th)}[case.pop("teacher", "hidden")]
    with pytest.raises(ValueError, match=r"^fastdistill\.fused_linear_kd_loss: " + match):
        fused_linear_kd_loss(h, w, **teacher, **case)


def test_bad_kd_arguments_name_the_kd_kernel():
    h, w, b, t = problem(4, 8, 20)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        fused_linear_kd_loss(h, w, **t, temperature=0.0)
    with pytest.raises(RuntimeError, match="labels must be in \\[0, 20\\)"):
        fused_linear_kd_loss(h, w, **t, labels=torch.tensor([0, 1, 20, 2]))


def test_peak_memory_beyond_inputs_and_gradients():
    """The issue's memory target: at 2048 rows x 1024 -> 32000 (fp32) a fwd+bwd step needs at most 1/8 of one logits
    tensor beyond the inputs and the gradients; the unfused path needs several."""
    from fastdistill.bench.fused_linear import MEMORY_SHAPE, peak_memory

    ours = peak_memory(*MEMORY_SHAPE, "float32", "fastdistill")
    unfused_path = peak_memory(*MEMORY_SHAPE, "float32", "unfused")
    assert ours <= 1 / 8, ours
    assert unfused_path >= 1.0, unfused_path

"""kd_loss against a top-k teacher (teacher_topk=(indices, logprobs)), CPU: the fp64 reference, every divergence,
reduction and tail mode, k from 1 to the whole vocabulary (where it is the dense loss), unused slots, every dtype
and CPU ISA path, opcheck, torch.compile, errors."""
import pytest
import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import kd_loss
from fastdistill.reference import kd_topk_loss_reference
from bounds import assert_logits_gradient

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1, 3, 33, 101, 1000]
NEG_INF = float("-inf")


def logits(shape, dtype=torch.float32, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def topk_of(teacher, k, temperature, dtype=torch.float32, unused_rows=(), seed=0):
    """The teacher's top-k log-probabilities at the temperature (what an offline cache stores), in `dtype`. Rows in
    `unused_rows` get their last slot marked unused (-inf) with a garbage index, row unused_rows[-1] all slots."""
    lp, idx = F.log_softmax(teacher.double() / temperature, dim=-1).topk(k, dim=-1)
    lp, idx = lp.to(dtype).clone(), idx.clone()
    flat_lp, flat_idx = lp.view(-1, k), idx.view(-1, k)
    g = torch.Generator().manual_seed(seed)
    for r in unused_rows:
        flat_lp[r, -1] = NEG_INF
        flat_idx[r, -1] = int(torch.randint(-5, teacher.shape[-1] + 5, (1,), generator=g))
    if unused_rows:
        flat_lp[unused_rows[-1]] = NEG_INF
    return idx, lp


def err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def check_against_reference(student, topk, grad_out=None, floor=1e-5, **kw):
    """kd_loss(teacher_topk=...) and its gradient against the fp64 reference, with the kd_loss tests' rule: within
    2x the error of plain PyTorch in fp32 on the same inputs plus `floor` relative; 16-bit gradients per element
    within one unit of their dtype on top of that."""
    idx, lp = topk
    s = student.clone().requires_grad_()
    out = kd_loss(s, teacher_topk=(idx, lp), **kw)
    s64 = student.double().requires_grad_()
    ref = kd_topk_loss_reference(s64, idx, lp.double(), **kw)
    s_plain = student.detach().float().clone().requires_grad_()
    plain = kd_topk_loss_reference(s_plain, idx, lp.float(), **kw)
    if grad_out is None:
        grad_out = torch.full_like(ref, 0.37) if ref.dim() == 0 else torch.randn_like(ref)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out.double())
    plain.backward(grad_out.to(plain.dtype))
    with torch.no_grad():
        no_grad = kd_loss(student, teacher_topk=(idx, lp), **kw)
    scale = 1.0 + ref.abs().max().item()
    assert torch.isfinite(ref).all()
    for loss in (out, no_grad):
        assert loss.dtype == torch.float32 and loss.shape == ref.shape
        assert err(loss, ref) <= 2 * err(plain, ref) + floor * scale, (err(loss, ref), err(plain, ref))
    assert s.grad.dtype == student.dtype and s.grad.shape == student.shape
    assert_logits_gradient(s.grad, s64.grad, s_plain.grad, grad_out, floor)


MODES = [("bucket", d) for d in DIVERGENCES] + [("renormalize", "forward_kl")]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tail,divergence", MODES)
def test_matches_fp64_reference(isa, tail, divergence, dtype, vocab):
    shape = (7, vocab)
    s, t = logits(shape, dtype, seed=1), logits(shape, seed=2)
    labels = torch.randint(0, vocab, (7,))
    labels[2] = -100
    for k in sorted({1, min(5, vocab), vocab}):
        for unused in ((), (3, 5)):
            topk = topk_of(t, k, 2.0, unused_rows=unused)
            for i, reduction in enumerate(REDUCTIONS):
                hard = dict(labels=labels, hard_weight=0.4) if i % 2 else {}
                check_against_reference(s, topk, temperature=2.0, divergence=divergence, beta=0.3,
                                        reduction=reduction, topk_tail=tail, **hard)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprob_dtypes_and_leading_dims(dtype):
    s, t = logits((2, 3, 257)), logits((2, 3, 257), seed=3)
    topk = topk_of(t, 20, 1.5, dtype=dtype, unused_rows=(4,))
    for divergence in DIVERGENCES:
        check_against_reference(s, topk, temperature=1.5, divergence=divergence, reduction="none")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab", [3, 101, 1000, 32000])
def test_whole_vocabulary_equals_dense_kd_loss(isa, divergence, vocab):
    s, t = logits((5, vocab), seed=4), logits((5, vocab), seed=5)
    labels = torch.randint(0, vocab, (5,))
    lp, idx = F.log_softmax(t / 2.0, dim=-1).topk(vocab, dim=-1)  # every token, in the teacher's order
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, labels=labels, hard_weight=0.25, reduction="none")
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    topk_loss, dense_loss = kd_loss(a, teacher_topk=(idx, lp), **kw), kd_loss(b, t, **kw)
    g = torch.randn(5)
    topk_loss.backward(g)
    dense_loss.backward(g)
    torch.testing.assert_close(topk_loss, dense_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_tail_mass_is_a_sum_not_one_minus_the_used_mass(isa):
    # The student puts all but ~1e-25 of its mass on the teacher's top-3: 1 - sum q is 0 in fp32 (and fp64), and
    # forward KL's tail term p_tail log(p_tail / q_tail) needs q_tail itself.
    s = torch.full((2, 1000), -30.0)
    s[:, :3] = torch.tensor([30.0, 29.0, 28.0])
    lp = torch.tensor([[-0.5, -1.5, -2.5]] * 2)
    idx = torch.tensor([[0, 1, 2]] * 2)
    for divergence in DIVERGENCES:
        check_against_reference(s, (idx, lp), divergence=divergence, reduction="none")
    out = kd_loss(s, teacher_topk=(idx, lp), reduction="none")
    assert torch.isfinite(out).all() and (out > 1).all()


def test_unused_slots_indices_are_not_read():
    s, t = logits((4, 50)), logits((4, 50), seed=6)
    idx, lp = topk_of(t, 6, 1.0)
    lp[:, -2:] = NEG_INF
    other = idx.clone()
    other[:, -2] = -7
    other[:, -1] = other[:, 0]  # a duplicate of a used index, in an unused slot
    for divergence in DIVERGENCES:
        a = kd_loss(s, teacher_topk=(idx, lp), divergence=divergence, reduction="none")
        b = kd_loss(s, teacher_topk=(other, lp), divergence=divergence, reduction="none")
        assert torch.equal(a, b)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.int16, torch.uint16, torch.uint8, torch.int8])
def test_index_dtypes(index_dtype):
    s, t = logits((6, 100)), logits((6, 100), seed=7)
    idx, lp = topk_of(t, 9, 1.0)
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = kd_loss(x, teacher_topk=(idx, lp), divergence="jsd")
    b = kd_loss(y, teacher_topk=(idx.to(index_dtype), lp), divergence="jsd")
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(x.grad, y.grad)


def test_non_contiguous_inputs():
    s, t = logits((3, 9, 64)), logits((3, 9, 64), seed=8)
    idx, lp = topk_of(t, 7, 1.0)
    view = s[:, :-1]  # strided rows
    idx_t, lp_t = idx[:, :-1].transpose(0, 1), lp[:, :-1].transpose(0, 1)
    a = kd_loss(view.transpose(0, 1), teacher_topk=(idx_t, lp_t), reduction="none")
    b = kd_loss(view.transpose(0, 1).contiguous(), teacher_topk=(idx_t.contiguous(), lp_t.contiguous()),
                reduction="none")
    assert torch.equal(a, b)


def test_all_rows_ignored_gives_zero():
    s = logits((3, 20)).requires_grad_()
    idx, lp = topk_of(logits((3, 20), seed=9), 4, 1.0)
    labels = torch.full((3,), -100)
    for tail, divergence in MODES:
        loss = kd_loss(s, teacher_topk=(idx, lp), labels=labels, hard_weight=0.5, topk_tail=tail,
                       divergence=divergence)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
        s.grad = None


def test_rows_without_used_slots_have_no_soft_term():
    s = logits((2, 30)).requires_grad_()
    idx, lp = torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), NEG_INF)
    for tail, divergence in MODES:
        loss = kd_loss(s, teacher_topk=(idx, lp), topk_tail=tail, divergence=divergence, reduction="sum")
        loss.backward()
        assert loss.item() == 0.0 and s.grad.abs().max().item() == 0.0
        s.grad = None


def test_kdloss_module_takes_teacher_topk():
    s, t = logits((4, 40)), logits((4, 40), seed=10)
    topk = topk_of(t, 5, 2.0)
    crit = fastdistill.KDLoss(temperature=2.0, topk_tail="renormalize")
    assert torch.equal(crit(s, teacher_topk=topk), kd_loss(s, teacher_topk=topk, temperature=2.0,
                                                           topk_tail="renormalize"))


def test_double_backward_is_a_clear_error():
    s = logits((3, 10)).requires_grad_()
    topk = topk_of(logits((3, 10), seed=1), 3, 1.0)
    loss = kd_loss(s, teacher_topk=topk)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


def test_opcheck():
    s = logits((5, 37)).requires_grad_()
    idx, lp = topk_of(logits((5, 37), seed=1), 6, 2.0, dtype=torch.bfloat16, unused_rows=(1, 3))
    labels = torch.tensor([1, 2, -100, 4, 36])
    fwd = torch.ops.fastdistill.kd_topk_forward.default
    for tail, div in MODES:
        args = (s, idx.to(torch.int32), lp, labels, 2.0, div, 0.4, -100, 4.0, 0.5, tail)
        torch.library.opcheck(fwd, args)
        _, stats = fwd(*args)
        torch.library.opcheck(torch.ops.fastdistill.kd_topk_backward.default,
                              (torch.randn(5), s.detach(), *args[1:4], stats, *args[4:]),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    s, t = logits((6, 500)), logits((6, 500), seed=2)
    idx, lp = topk_of(t, 16, 2.0)
    labels = torch.randint(0, 500, (6,))

    def step(x, i, p, lab):
        return kd_loss(x, teacher_topk=(i, p), temperature=2.0, divergence="jsd", labels=lab, hard_weight=0.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    a, b = compiled(x1, idx, lp, labels), step(x2, idx, lp, labels)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(x1.grad, x2.grad)


def test_torch_compile_inductor():
    s, t = logits((4, 300)), logits((4, 300), seed=2)
    topk = topk_of(t, 8, 3.0)
    f = torch.compile(lambda x, i, p: kd_loss(x, teacher_topk=(i, p), temperature=3.0) * 2, fullgraph=True)
    x = s.clone().requires_grad_()
    out = f(x, *topk)
    out.backward()
    torch.testing.assert_close(out, kd_loss(s, teacher_topk=topk, temperature=3.0) * 2)


def _bad(case):
    s = logits(case.pop("s", (4, 10)))
    idx, lp = topk_of(logits((4, 10), seed=1), 3, 1.0)
    idx, lp = case.pop("idx", idx), case.pop("lp", lp)
    teacher = case.pop("teacher", None)
    topk = case.pop("topk", (idx, lp))
    return lambda: kd_loss(s, teacher, teacher_topk=topk, **case)


BAD_INPUTS = [
    (dict(teacher=logits((4, 10))), ValueError, "teacher_logits or teacher_topk, not both"),
    (dict(topk=None), ValueError, "no teacher"),
    (dict(topk=torch.zeros(4, 3)), TypeError, "teacher_topk must be a pair of tensors"),
    (dict(idx=torch.zeros(5, 3, dtype=torch.long)), RuntimeError,
     "indices and logprobs must both be \\(..., k\\) with the logits' leading shape \\[4\\]"),
    (dict(lp=torch.zeros(4, 2)), RuntimeError, "indices and logprobs must both be"),
    (dict(idx=torch.zeros(4, 3)), RuntimeError, "indices must be an integer tensor .*got Float"),
    (dict(lp=torch.zeros(4, 3, dtype=torch.float64)), RuntimeError, "logprobs must be float32, bfloat16 or float16"),
    (dict(idx=torch.tensor([[0, 1, 2]] * 3 + [[0, 1, 10]])), RuntimeError,
     "indices must be in \\[0, 10\\), got 10 at row 3, slot 2"),
    (dict(idx=torch.tensor([[0, 1, 2]] * 2 + [[-1, 1, 2]] * 2)), RuntimeError, "got -1 at row 2, slot 0"),
    (dict(idx=torch.tensor([[0, 1, 2], [4, 5, 4], [0, 1, 2], [0, 1, 2]])), RuntimeError,
     "used indices must be distinct within a row, got 4 twice in row 1"),
    (dict(topk_tail="zero"), RuntimeError, "topk_tail must be 'bucket' or 'renormalize', got 'zero'"),
    (dict(topk_tail="renormalize", divergence="reverse_kl"), RuntimeError,
     "topk_tail='renormalize' is defined for divergence='forward_kl' only"),
    (dict(topk_tail="renormalize", divergence="jsd", beta=0.5), RuntimeError, "forward_kl' only"),
    (dict(labels=torch.tensor([0, 1, 10, 2]), hard_weight=1.0), RuntimeError, "labels must be in \\[0, 10\\)"),
]


@pytest.mark.parametrize("case,exc,match", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_inputs(case, exc, match):
    with pytest.raises(exc, match="^fastdistill.kd_loss: .*" + match):
        _bad(dict(case))()


def test_backward_op_checks_indices_too():
    s = logits((2, 10))
    idx, lp = topk_of(logits((2, 10), seed=1), 3, 1.0)
    _, stats = torch.ops.fastdistill.kd_topk_forward(s, idx, lp, None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0,
                                                      "bucket")
    idx[1, 0] = 99
    with pytest.raises(RuntimeError, match="^fastdistill.kd_loss: teacher_topk indices must be in \\[0, 10\\), got 99"):
        torch.ops.fastdistill.kd_topk_backward(torch.ones(2), s, idx, lp, None, stats, 1.0, "forward_kl", 0.5, -100,
                                               1.0, 0.0, "bucket")


# ---------------------------------------------------------------- the fused lm_head with a top-k teacher
def head_problem(rows, hidden, vocab, k, dtype=torch.float32, bias=False, seed=0):
    h = logits((rows, hidden), dtype, 1.0, seed)
    w = logits((vocab, hidden), dtype, 2.0 / max(hidden, 1) ** 0.5, seed + 1)
    b = logits((vocab,), dtype, 1.0, seed + 2) if bias else None
    topk = topk_of(logits((rows, vocab), seed=seed + 3), min(k, vocab), 2.0, unused_rows=(1,) if rows > 1 else ())
    return h, w, b, topk


def check_fused_against_reference(h, w, b, topk, chunk_size=None, floor=1e-5, **kw):
    """fused_linear_kd_loss(teacher_topk=...) against the fp64 unfused formula (F.linear, then the top-k reference),
    within 2x PyTorch's own unfused error in the inputs' dtype (F.linear in it, the loss in fp32)."""
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    out = fastdistill.fused_linear_kd_loss(leaves[0], leaves[1], student_bias=leaves[2], teacher_topk=topk,
                                           chunk_size=chunk_size, **kw)

    def unfused(dtype):
        xs = [x.detach().to(dtype).requires_grad_() if x is not None else None for x in (h, w, b)]
        loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        loss = kd_topk_loss_reference(F.linear(*xs).to(loss_dtype), topk[0], topk[1].to(loss_dtype), **kw)
        return loss, xs

    ref, ref_x = unfused(torch.float64)
    plain, plain_x = unfused(h.dtype)
    grad_out = torch.full_like(ref, 0.37) if ref.dim() == 0 else torch.randn_like(ref)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    plain.backward(grad_out.to(plain.dtype))
    scale = 1.0 + ref.abs().max().item()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert err(out, ref) <= 2 * err(plain, ref) + floor * scale, (err(out, ref), err(plain, ref))
    for x, ours, r, p in zip((h, w, b), leaves, ref_x, plain_x):
        if x is None:
            continue
        assert ours.grad.dtype == x.dtype
        gscale = 1.0 + r.grad.abs().max().item()
        assert err(ours.grad, r.grad) <= 2 * err(p.grad, r.grad) + floor * gscale, (err(ours.grad, r.grad),
                                                                                     err(p.grad, r.grad))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tail,divergence", MODES)
def test_fused_linear_matches_fp64_reference(tail, divergence, reduction, bias):
    h, w, b, topk = head_problem(11, 24, 101, 7, bias=bias)
    labels = torch.randint(0, 101, (11,))
    labels[4] = -100
    check_fused_against_reference(h, w, b, topk, chunk_size=4, temperature=2.0, divergence=divergence, beta=0.3,
                                  reduction=reduction, topk_tail=tail, labels=labels, hard_weight=0.3)


@pytest.mark.parametrize("vocab", [1, 3, 33, 101, 1000])
@pytest.mark.parametrize("hidden", [1, 3, 33])
def test_fused_linear_awkward_sizes(hidden, vocab):
    h, w, b, topk = head_problem(5, hidden, vocab, 5, bias=True)
    check_fused_against_reference(h, w, b, topk, chunk_size=2, divergence="jsd", temperature=1.5)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_fused_linear_equals_kd_loss_on_the_linear_outputs(chunk_size):
    h, w, b, topk = head_problem(10, 16, 300, 12, bias=True)
    kw = dict(temperature=2.0, divergence="reverse_kl", reduction="sum")
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    fused = fastdistill.fused_linear_kd_loss(leaves[0], leaves[1], student_bias=leaves[2], teacher_topk=topk,
                                             chunk_size=chunk_size, **kw)
    plain = [x.clone().requires_grad_() for x in (h, w, b)]
    unfused = kd_loss(F.linear(*plain), teacher_topk=topk, **kw)
    fused.backward()
    unfused.backward()
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    for a, c in zip(leaves, plain):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-4, atol=1e-5)


def test_fused_linear_bf16_and_leading_dims():
    h, w, _, _ = head_problem(6, 20, 80, 4, dtype=torch.bfloat16)
    topk = topk_of(logits((2, 3, 80), seed=5), 6, 1.0, dtype=torch.bfloat16)
    labels = torch.randint(0, 80, (2, 3))
    check_fused_against_reference(h.view(2, 3, 20), w, None, topk, labels=labels, hard_weight=0.5, reduction="none")


def test_fused_linear_module_and_all_rows_ignored():
    h, w, b, topk = head_problem(4, 8, 30, 3)
    x, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    crit = fastdistill.FusedLinearKDLoss(topk_tail="renormalize", hard_weight=0.5)
    loss = crit(x, wx, teacher_topk=topk, labels=torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0 and wx.grad.abs().max().item() == 0.0


def test_fused_linear_torch_compile_fullgraph():
    h, w, b, topk = head_problem(8, 16, 64, 5)

    def step(x, wx, i, p):
        return fastdistill.fused_linear_kd_loss(x, wx, teacher_topk=(i, p), chunk_size=3, divergence="jsd")

    x1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    a = torch.compile(step, fullgraph=True, backend="aot_eager")(x1, w1, *topk)
    c = step(x2, w2, *topk)
    a.backward()
    c.backward()
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


FUSED_BAD = [
    (dict(teacher_logits=logits((4, 30))), "exactly one form.*\\(got both\\)"),
    (dict(teacher_bias=logits((30,))), "teacher_bias goes with teacher_weight, not with teacher_topk"),
    (dict(teacher_topk=(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3))),
     "teacher_topk indices and logprobs must both be \\(..., k\\) with the student's leading shape \\[4\\]"),
]


@pytest.mark.parametrize("case,match", FUSED_BAD, ids=[m[:30] for _, m in FUSED_BAD])
def test_fused_linear_bad_inputs(case, match):
    h, w, _, topk = head_problem(4, 8, 30, 3)
    kw = dict(teacher_topk=topk)
    kw.update(case)
    with pytest.raises(ValueError, match="^fastdistill.fused_linear_kd_loss: .*" + match):
        fastdistill.fused_linear_kd_loss(h, w, **kw)


# ---------------------------------------------------------------- the CUDA kernels, through the SIMT emulator
def simt_ops():
    import fastdistill._simt  # noqa: F401  (registers torch.ops.fastdistill_simt)
    return torch.ops.fastdistill_simt


def simt_case(student, topk, labels=None, threads=0, grad_rows=None, **kw):
    """Row losses and gradient of the emulated CUDA kernels, and of the CPU ops on the same inputs."""
    T, div, beta, hw, tail = (kw.get("temperature", 1.0), kw.get("divergence", "forward_kl"), kw.get("beta", 0.5),
                              kw.get("hard_weight", 0.0), kw.get("topk_tail", "bucket"))
    args = (student, *topk, labels, T, div, beta, -100, T * T, hw, tail)
    rows = student.numel() // student.shape[-1]
    grad_rows = torch.rand(rows) + 0.5 if grad_rows is None else grad_rows
    ns = simt_ops()
    loss, stats = ns.kd_topk_forward(*args, threads)
    grad = ns.kd_topk_backward(grad_rows, student, *topk, labels, stats, *args[4:], threads)
    return loss, grad, grad_rows


@pytest.mark.parametrize("threads", [32, 64, 0])
@pytest.mark.parametrize("tail,divergence", MODES)
@pytest.mark.parametrize("vocab,k", [(1, 1), (3, 3), (33, 5), (1001, 40), (20000, 64)])
def test_simt_matches_fp64_reference(vocab, k, tail, divergence, threads):
    for dtype in DTYPES:
        s = logits((4, vocab), dtype, seed=11)
        idx, lp = topk_of(logits((4, vocab), seed=12), min(k, vocab), 2.0, dtype=torch.bfloat16, unused_rows=(2,))
        labels = torch.randint(0, vocab, (4,))
        labels[1] = -100
        kw = dict(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.4, topk_tail=tail)
        loss, grad, grad_rows = simt_case(s, (idx.to(torch.int32), lp), labels, threads, **kw)
        ref_kw = dict(kw, reduction="none", labels=labels)
        x64, x32 = s.double().requires_grad_(), s.float().requires_grad_()
        ref = kd_topk_loss_reference(x64, idx, lp.double(), **ref_kw)
        plain = kd_topk_loss_reference(x32, idx, lp.float(), **ref_kw)
        ref.backward(grad_rows.double())
        plain.backward(grad_rows)
        assert err(loss, ref) <= 2 * err(plain, ref) + 1e-5 * (1 + ref.abs().max().item())
        floor = torch.finfo(dtype).eps * x64.grad.abs().max().item() + 1e-6
        assert err(grad, x64.grad) <= 2 * err(x32.grad, x64.grad) + floor, (err(grad, x64.grad), err(x32.grad, x64.grad))


def test_simt_equals_cpu_on_the_tail_sum_case():
    s = torch.full((2, 1000), -30.0)
    s[:, :3] = torch.tensor([30.0, 29.0, 28.0])
    topk = (torch.tensor([[0, 1, 2]] * 2), torch.tensor([[-0.5, -1.5, -2.5]] * 2))
    for divergence in DIVERGENCES:
        loss, grad, g = simt_case(s, topk, divergence=divergence, threads=64)
        x = s.clone().requires_grad_()
        cpu = kd_loss(x, teacher_topk=topk, divergence=divergence, reduction="none")
        cpu.backward(g)
        torch.testing.assert_close(loss, cpu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-7)


def test_simt_bad_indices_are_device_side_asserts():
    s = logits((2, 10))
    idx, lp = torch.tensor([[0, 1, 2], [3, 11, 4]]), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="device-side assert: fastdistill.kd_loss: a used teacher_topk index is "
                                           "outside \\[0, V\\)"):
        simt_case(s, (idx, lp))
    with pytest.raises(RuntimeError, match="device-side assert: fastdistill.kd_loss: teacher_topk has a duplicate"):
        simt_case(s, (torch.tensor([[0, 1, 2], [3, 4, 3]]), lp))
    with pytest.raises(RuntimeError, match="device-side assert: fastdistill.kd_loss: a label is outside"):
        simt_case(s, (torch.tensor([[0, 1, 2]] * 2), lp), labels=torch.tensor([0, 10]), hard_weight=1.0)


def test_simt_vocabulary_limit_is_a_clear_error():
    s = torch.zeros(1, 262145)
    with pytest.raises(RuntimeError, match="^fastdistill.kd_loss: teacher_topk on a GPU supports a vocabulary of at "
                                           "most 262144, got 262145"):
        simt_case(s, (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1)))


@pytest.mark.cuda
@pytest.mark.parametrize("tail,divergence", MODES)
def test_cuda_matches_cpu(tail, divergence):
    s, t = logits((6, 32000), torch.bfloat16, seed=13), logits((6, 32000), seed=14)
    idx, lp = topk_of(t, 64, 2.0, unused_rows=(3,))
    labels = torch.randint(0, 32000, (6,))
    kw = dict(temperature=2.0, divergence=divergence, topk_tail=tail, labels=labels, hard_weight=0.5,
              reduction="none")
    x, xc = s.clone().requires_grad_(), s.cuda().requires_grad_()
    cpu, gpu = kd_loss(x, teacher_topk=(idx, lp), **kw), kd_loss(xc, teacher_topk=(idx.cuda(), lp.cuda()), **kw)
    g = torch.rand(6) + 0.5
    cpu.backward(g)
    gpu.backward(g.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("tail,divergence", MODES)
def test_masked_vocabulary_and_large_magnitudes(isa, tail, divergence):
    s, t = logits((6, 777), seed=15), logits((6, 777), seed=16)
    s[:, 700:] = NEG_INF  # a masked (padded) vocabulary: zero-probability tail columns
    topk = topk_of(t[:, :700], 12, 1.0, unused_rows=(2, 4))
    check_against_reference(s, topk, divergence=divergence, topk_tail=tail, reduction="none")
    big = logits((4, 3001), scale=2e4, seed=17)  # |logits| / T ~ 1e4: one column holds the student's mass
    topk = topk_of(logits((4, 3001), seed=18), 30, 2.0)
    check_against_reference(big, topk, temperature=2.0, divergence=divergence, topk_tail=tail, reduction="sum")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_training_path_equals_two_op_path(isa, dtype, reduction):
    """Eager CPU training writes each row's gradient in the forward (kd_topk_fused); the backward hands it over,
    scaled by grad_output. It equals kd_topk_forward + kd_topk_backward (what torch.compile traces)."""
    s, t = logits((9, 333), dtype, seed=19), logits((9, 333), seed=20)
    idx, lp = topk_of(t, 11, 2.0, unused_rows=(4,))
    labels = torch.randint(0, 333, (9,))
    labels[3] = -100
    for tail, divergence in MODES:
        kw = dict(temperature=2.0, divergence=divergence, beta=0.3, labels=labels, hard_weight=0.4, topk_tail=tail,
                  reduction=reduction)
        x = s.clone().requires_grad_()
        loss = kd_loss(x, teacher_topk=(idx, lp), **kw)
        g = torch.full_like(loss, 0.25) if loss.dim() == 0 else torch.rand_like(loss) + 0.5
        loss.backward(g, retain_graph=True)
        first = x.grad.clone()
        x.grad = None
        loss.backward(g)  # a second backward recomputes through kd_topk_backward
        params = (2.0, divergence, 0.3, -100, 4.0, 0.4, tail)
        rows, stats = torch.ops.fastdistill.kd_topk_forward(s, idx, lp, labels, *params)
        r = rows.clone().requires_grad_()
        fastdistill.loss._reduce(r, s.shape, labels, -100, reduction).backward(g)
        want = torch.ops.fastdistill.kd_topk_backward(r.grad.contiguous(), s, idx, lp, labels, stats, *params)
        assert torch.equal(loss, fastdistill.loss._reduce(rows, s.shape, labels, -100, reduction))
        torch.testing.assert_close(first, want, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-7)
        assert torch.equal(x.grad, want)

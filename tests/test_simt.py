"""The CUDA kernels, run on the CPU through the SIMT emulator (torch.ops.fastdistill_simt.*), against
the fp64 references; plus tests of the emulator itself (it must expose missing synchronisation)."""
import pytest
import torch

from fastdistill.reference import kd_loss_reference

simt = pytest.importorskip("fastdistill._simt", reason="fastdistill._simt (emulator test build) is not built")
ops = torch.ops.fastdistill_simt

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------ the emulator
def test_missing_syncthreads_gives_wrong_result():
    x = torch.randn(4, 96)
    torch.testing.assert_close(ops.selftest_rotate(x, True), x.roll(-1, 1), rtol=0, atol=0)
    bad = ops.selftest_rotate(x, False)
    assert not torch.equal(bad, x.roll(-1, 1))
    assert bad.isnan().any()  # it read shared memory nobody had written yet (the poison)


def test_missing_syncwarp_gives_wrong_result():
    x = torch.randn(3, 128)
    want = x.view(3, 4, 32).sum(-1)
    torch.testing.assert_close(ops.selftest_warp_sum_smem(x, True), want, rtol=1e-5, atol=1e-5)
    bad = ops.selftest_warp_sum_smem(x, False)
    assert not torch.allclose(bad, want, rtol=1e-3, atol=1e-3, equal_nan=False)


def test_primitives():
    x = torch.randint(0, 200, (256,), dtype=torch.int32)
    out, counters = ops.selftest_primitives(x)
    w = x.view(-1, 32).long()
    lane = torch.arange(32)
    expect = torch.zeros(w.shape[0], 32, 9, dtype=torch.long)
    expect[..., 0] = w[:, 3:4]
    expect[..., 1] = w[:, lane ^ 1]
    expect[..., 2] = torch.where(lane + 2 < 32, w[:, (lane + 2).clamp(max=31)], w)
    expect[..., 3] = torch.where(lane >= 1, w[:, (lane - 1).clamp(min=0)], w)
    ballot = ((w & 1) << lane).sum(-1)
    expect[..., 4] = torch.where(ballot >= 2**31, ballot - 2**32, ballot)[:, None]
    expect[..., 5] = (w > 100).any(-1, keepdim=True).long()
    expect[..., 6] = (w >= 0).all(-1, keepdim=True).long()
    expect[..., 7] = w.sum(-1, keepdim=True)
    b0 = [((w >> (8 * i)) & 0xFF) for i in range(4)]
    b1 = [(((w + 1) >> (8 * i)) & 0xFF) for i in range(4)]
    sb = lambda v: torch.where(v >= 128, v - 256, v)  # noqa: E731
    expect[..., 8] = sum(sb(a) * sb(b) for a, b in zip(b0, b1)) + 7
    assert torch.equal(out[:, :9].long().view(-1, 32, 9), expect)
    assert counters.tolist() == [int(x.sum()), int(x.max())]


def test_divergent_barrier_is_an_error():
    with pytest.raises(RuntimeError, match="divergent barrier"):
        ops.selftest_divergent_barrier()


def test_misaligned_vector_load_is_an_error():
    with pytest.raises(RuntimeError, match="misaligned 16-byte vector load"):
        ops.selftest_misaligned_load()


# ------------------------------------------------------------------------------------------ kd_loss
def _kd_case(rows, V, sdt, tdt, *, div, T, beta, hw, labels, threads, splits, scale=3.0, mask_inf=False,
             seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, V, generator=g, dtype=torch.float64) * scale).to(sdt)
    t = (torch.randn(rows, V, generator=g, dtype=torch.float64) * scale).to(tdt)
    if mask_inf:  # a masked vocabulary tail, identical in both (finite divergence)
        s[:, V // 2:] = float("-inf")
        t[:, V // 2:] = float("-inf")
    lab = None
    if labels:
        lab = torch.randint(0, V // 2 if mask_inf else V, (rows,), generator=g)
        lab[::3] = -100
    soft_coef = T * T
    loss, stats = ops.kd_loss_forward(s, t, lab, T, div, beta, -100, soft_coef, hw, threads, splits)
    grad_rows = torch.rand(rows, generator=g, dtype=torch.float32) + 0.5
    grad = ops.kd_loss_backward(grad_rows, s, t, lab, stats, T, div, beta, -100, soft_coef, hw, threads, splits)
    return s, t, lab, grad_rows, loss, stats, grad


def _reference(s, t, lab, grad_rows, *, div, T, beta, hw, dtype):
    """Loss and gradient of the plain-PyTorch reference run in `dtype` (float64: the truth)."""
    x = s.to(dtype).requires_grad_()
    rows = kd_loss_reference(x, t.to(dtype), temperature=T, divergence=div, beta=beta, reduction="none",
                             labels=lab, hard_weight=hw)
    rows.backward(grad_rows.to(dtype))
    return rows.detach().double(), x.grad.double()


def _check(s, t, lab, grad_rows, loss, stats, grad, *, div, T, beta, hw):
    ref_loss, ref_grad = _reference(s, t, lab, grad_rows, div=div, T=T, beta=beta, hw=hw, dtype=torch.float64)
    f32_loss, f32_grad = _reference(s, t, lab, grad_rows, div=div, T=T, beta=beta, hw=hw, dtype=torch.float32)
    assert loss.dtype == torch.float32 and stats.shape == (s.shape[0], 4)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    # flash-attention's rule: at most 2x the error of plain PyTorch (fp32 compute), plus a floor; the
    # gradient is stored in the student's dtype, so its rounding is allowed on top, and the backward reads
    # logsumexps saved in fp32 (one ulp of |logit| / T, relative to the gradient's scale).
    err = (loss.double() - ref_loss).abs().max()
    base = (f32_loss - ref_loss).abs().max()
    assert err <= 2 * base + 1e-5 * (1 + ref_loss.abs().max()), (err, base)
    gerr = (grad.double() - ref_grad).abs().max()
    gbase = (f32_grad - ref_grad).abs().max()
    eps = torch.finfo(s.dtype).eps
    lse_ulp = torch.finfo(torch.float32).eps * (1 + s.double().abs().nan_to_num(0, 0, 0).max() / min(T, 1.0))
    scale = max(ref_grad.abs().max(), T * grad_rows.max())  # soft_coef / T = T: the coefficient of dD/db
    assert gerr <= 2 * gbase + eps * ref_grad.abs().max() + lse_ulp * scale + 1e-6, (gerr, gbase)
    # statistics: the two logsumexps at temperature T
    lse_s = torch.logsumexp(s.double() / T, -1)
    lse_t = torch.logsumexp(t.double() / T, -1)
    torch.testing.assert_close(stats[:, 0].double(), lse_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[:, 1].double(), lse_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("rows,V,threads,splits", [
    (1, 1, 32, 1),        # a single row, a single column
    (3, 3, 32, 4),        # more splits than packs: empty ranges
    (5, 127, 64, 1),      # V not a multiple of the pack width
    (2, 1001, 32, 3),     # fewer rows than blocks, odd V (misaligned rows: scalar path)
    (4, 1024, 128, 2),    # aligned rows: vector path, two splits
    (1, 20000, 32, 1),    # large V with few threads
])
def test_kd_loss_shapes(div, rows, V, threads, splits):
    kw = dict(div=div, T=2.0, beta=0.3, hw=0.0)
    out = _kd_case(rows, V, torch.float32, torch.float32, labels=False, threads=threads, splits=splits, **kw)
    _check(*out, **kw)


@pytest.mark.parametrize("sdt", DTYPES)
@pytest.mark.parametrize("tdt", DTYPES)
def test_kd_loss_dtypes(sdt, tdt):
    kw = dict(div="forward_kl", T=1.5, beta=0.5, hw=0.0)
    out = _kd_case(3, 777, sdt, tdt, labels=False, threads=64, splits=2, **kw)
    _check(*out, **kw)


@pytest.mark.parametrize("div,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.25), ("jsd", 0.0),
                                      ("jsd", 1.0)])
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_hard_labels(div, beta, T, dtype):
    kw = dict(div=div, T=T, beta=beta, hw=0.7)
    out = _kd_case(7, 520, dtype, dtype, labels=True, threads=64, splits=0, **kw)
    s, t, lab, grad_rows, loss, stats, grad = out
    _check(*out, **kw)
    ignored = lab == -100
    assert torch.all(loss[ignored] == 0) and torch.all(grad[ignored] == 0)
    torch.testing.assert_close(stats[:, 2].double(), torch.logsumexp(s.double(), -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_masked_vocab_and_large_logits(div):
    kw = dict(div=div, T=1.0, beta=0.5, hw=1.0)
    s, t, lab, grad_rows, loss, stats, grad = _kd_case(4, 300, torch.float32, torch.float32, labels=True, threads=32,
                                                       splits=2, mask_inf=True, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.all(grad[:, 150:] == 0)
    # masked columns contribute nothing: the reference on the unmasked half is the truth (PyTorch's own
    # autograd gives NaN through -inf logits for reverse KL / JSD)
    _check(s[:, :150], t[:, :150], lab, grad_rows, loss, stats, grad[:, :150].contiguous(), **kw)
    kw = dict(div=div, T=2.0, beta=0.5, hw=0.0)
    out = _kd_case(3, 400, torch.float32, torch.float32, labels=False, threads=64, splits=1, scale=300.0, **kw)
    _check(*out, **kw)


def test_kd_loss_all_rows_ignored():
    s, t = torch.randn(3, 50), torch.randn(3, 50)
    lab = torch.full((3,), -100)
    loss, stats = ops.kd_loss_forward(s, t, lab, 1.0, "forward_kl", 0.5, -100, 1.0, 1.0, 32, 1)
    grad = ops.kd_loss_backward(torch.ones(3), s, t, lab, stats, 1.0, "forward_kl", 0.5, -100, 1.0, 1.0, 32, 1)
    assert torch.all(loss == 0) and torch.all(grad == 0)


def test_kd_loss_strided_views():
    """Rows given by a two-level view (logits[:, :-1]), a transposed view (made contiguous) and a 3-D batch."""
    base_s, base_t = torch.randn(3, 6, 131), torch.randn(3, 6, 131)
    kw = dict(temperature=2.0, divergence="reverse_kl", beta=0.5, reduction="none")
    for s, t in [(base_s[:, :-1], base_t[:, :-1]), (base_s.transpose(0, 1), base_t.transpose(0, 1)),
                 (base_s[:, :, 1:], base_t[:, :, :-1])]:
        loss, stats = ops.kd_loss_forward(s, t, None, 2.0, "reverse_kl", 0.5, -100, 4.0, 0.0, 64, 2)
        ref = kd_loss_reference(s.double(), t.double(), **kw).reshape(-1)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
        g = torch.rand(loss.shape)
        grad = ops.kd_loss_backward(g, s, t, None, stats, 2.0, "reverse_kl", 0.5, -100, 4.0, 0.0, 64, 2)
        x = s.double().requires_grad_()
        kd_loss_reference(x, t.double(), **kw).reshape(-1).backward(g.double())
        assert grad.is_contiguous() and grad.shape == s.shape
        torch.testing.assert_close(grad.double(), x.grad, rtol=1e-5, atol=1e-6)


def test_kd_loss_schedules_agree():
    """Different block sizes / split counts are different reduction trees: all must agree closely."""
    s, t = torch.randn(2, 3000), torch.randn(2, 3000)
    outs = [ops.kd_loss_forward(s, t, None, 1.0, "jsd", 0.4, -100, 1.0, 0.0, th, sp)[0]
            for th, sp in [(32, 1), (64, 5), (256, 2), (1024, 1)]]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_kd_loss_matches_cpu_op():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastdistill::kd_loss_forward", "CPU"):
        pytest.skip("the CPU kd_loss op is not in this build yet")
    for div, beta, hw in [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 0.5), ("jsd", 0.3, 1.0)]:
        s, t = torch.randn(6, 1003).bfloat16(), torch.randn(6, 1003)
        lab = torch.randint(0, 1003, (6,))
        lab[1] = -100
        args = (lab, 2.0, div, beta, -100, 4.0, hw)
        loss, stats = ops.kd_loss_forward(s, t, *args, 64, 3)
        loss_c, stats_c = torch.ops.fastdistill.kd_loss_forward(s, t, *args)
        torch.testing.assert_close(loss, loss_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats, stats_c, rtol=1e-5, atol=1e-5)
        g = torch.rand(6)
        grad = ops.kd_loss_backward(g, s, t, lab, stats, *args[1:], 64, 3)
        grad_c = torch.ops.fastdistill.kd_loss_backward(g, s, t, lab, stats_c, *args[1:])
        torch.testing.assert_close(grad.float(), grad_c.float(), rtol=1e-2, atol=1e-5)


def test_kd_loss_errors():
    s = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="student and teacher must have the same shape"):
        ops.kd_loss_forward(s, torch.randn(2, 11), None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="divergence must be"):
        ops.kd_loss_forward(s, s, None, 1.0, "kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        ops.kd_loss_forward(s, s, torch.zeros(2, dtype=torch.int32), 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="student logits must be float32, bfloat16 or float16"):
        ops.kd_loss_forward(s.double(), s, None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        ops.kd_loss_forward(s, s, None, 0.0, "forward_kl", 0.5, -100, 1.0, 0.0)

"""The CUDA kernels, run on the CPU through the SIMT emulator (torch.ops.fastdistill_simt.*), against
the fp64 references; plus tests of the emulator itself (it must expose missing synchronisation)."""
import pytest
import torch

import fastdistill._simt  # noqa: F401  (registers torch.ops.fastdistill_simt; built with the package)
from fastdistill.reference import (compressed_2_4_sample, kd_loss_reference, kd_reverse_kl_grad_reference,
                                   quantize_symmetric_reference)

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
    assert loss.dtype == torch.float32 and stats.shape == (s.shape[0], 8)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    # flash-attention's rule: at most 2x the error of plain PyTorch (fp32 compute), plus a floor; the
    # gradient is stored in the student's dtype, so its rounding is allowed on top.
    err = (loss.double() - ref_loss).abs().max()
    base = (f32_loss - ref_loss).abs().max()
    assert err <= 2 * base + 1e-5 * (1 + ref_loss.abs().max()), (err, base)
    gerr = (grad.double() - ref_grad).abs().max()
    gbase = (f32_grad - ref_grad).abs().max()
    eps = torch.finfo(s.dtype).eps
    assert gerr <= 2 * gbase + eps * ref_grad.abs().max() + 1e-6, (gerr, gbase)
    # statistics: each logsumexp at temperature T as (raw max, log sum exp((x - max) / T))
    for col, x in ((0, s), (2, t)):
        torch.testing.assert_close(stats[:, col].double(), x.double().amax(-1))
        torch.testing.assert_close(stats[:, col].double() / T + stats[:, col + 1].double(),
                                   torch.logsumexp(x.double() / T, -1), rtol=1e-5, atol=1e-5)


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
    torch.testing.assert_close(stats[:, 0].double() + stats[:, 4].double(), torch.logsumexp(s.double(), -1),
                               rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("threads,splits", [(256, 1), (64, 3)])
def test_kd_loss_peaked_softmax_loses_nothing_to_cancellation(div, threads, splits):
    """|logits| / T ~ 1e4: one column holds all of q. Within 2x plain float32 PyTorch's error, no floor (the
    CPU test of the same name explains the float64 truth)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5000, generator=g) * 9000, torch.randn(6, 5000, generator=g) * 9000
    T, grad_rows = 2.0, torch.full((6,), 0.37)
    loss, stats = ops.kd_loss_forward(s, t, None, T, div, 0.3, -100, T * T, 0.0, threads, splits)
    grad = ops.kd_loss_backward(grad_rows, s, t, None, stats, T, div, 0.3, -100, T * T, 0.0, threads, splits)
    kw = dict(div=div, T=T, beta=0.3, hw=0.0)
    ref_loss, ref_grad = _reference(s, t, None, grad_rows, dtype=torch.float64, **kw)
    if div == "reverse_kl":
        ref_grad = 0.37 * kd_reverse_kl_grad_reference(s, t, T)
    f32_loss, f32_grad = _reference(s, t, None, grad_rows, dtype=torch.float32, **kw)
    for ours, plain, ref in ((loss, f32_loss, ref_loss), (grad, f32_grad, ref_grad)):
        err, base = (ours.double() - ref).abs().max(), (plain - ref).abs().max()
        assert err <= 2 * base, (err, base)


def test_kd_loss_schedules_agree():
    """Different block sizes / split counts are different reduction trees: all must agree closely."""
    s, t = torch.randn(2, 3000), torch.randn(2, 3000)
    outs = [ops.kd_loss_forward(s, t, None, 1.0, "jsd", 0.4, -100, 1.0, 0.0, th, sp)[0]
            for th, sp in [(32, 1), (64, 5), (256, 2), (1024, 1)]]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_kd_loss_matches_cpu_op():
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


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
@pytest.mark.parametrize("hw", [0.0, 0.5])
@pytest.mark.parametrize("bad", [50, -5])
def test_kd_loss_label_out_of_range_is_a_device_assert(div, hw, bad):
    # The CUDA glue cannot range-check labels without a host sync; the kernel asserts instead.
    s = torch.randn(3, 50)
    lab = torch.tensor([1, bad, -100])
    with pytest.raises(RuntimeError, match="device-side assert: fastdistill.kd_loss: a label is outside"):
        ops.kd_loss_forward(s, s, lab, 1.0, div, 0.5, -100, 1.0, hw, 32, 1)
    ops.kd_loss_forward(s, s, torch.tensor([1, 49, -100]), 1.0, div, 0.5, -100, 1.0, hw, 32, 1)  # in range


def test_kd_loss_errors():
    s = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.kd_loss: (.*)?" "student and teacher must have the same shape"):
        ops.kd_loss_forward(s, torch.randn(2, 11), None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.kd_loss: (.*)?" "divergence must be"):
        ops.kd_loss_forward(s, s, None, 1.0, "kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.kd_loss: (.*)?" "labels must be int64"):
        ops.kd_loss_forward(s, s, torch.zeros(2, dtype=torch.int32), 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.kd_loss: (.*)?" "student logits must be float32, bfloat16 or float16"):
        ops.kd_loss_forward(s.double(), s, None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.kd_loss: (.*)?" "temperature must be a finite number > 0"):
        ops.kd_loss_forward(s, s, None, 0.0, "forward_kl", 0.5, -100, 1.0, 0.0)


# --------------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 15), (2, 3, 33), (4, 1000), (1, 4096)])
def test_int8_quantize_per_token(dtype, shape):
    x = (torch.randn(shape) * 5).to(dtype)
    if x.dim() > 1 and x.shape[0] > 1:
        x[1] = 0  # a zero row: s = 0, q = 0
    x.view(-1)[0] = 2.5 * (x.abs().max().float() / 127).to(dtype)  # a tie is likely somewhere: rne
    q, s = ops.quantize_per_token(x)
    qr, sr = quantize_symmetric_reference(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    qc, sc = torch.ops.fastdistill.quantize_per_token(x)
    assert torch.equal(q, qc) and torch.equal(s, sc)


def test_int8_quantize_per_channel_rejects_nonfinite():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"^fastdistill\.quantize_per_channel: (.*)?" "NaN or Inf"):
        ops.quantize_per_channel(w)


@pytest.mark.parametrize("M,N,K", [
    (1, 1, 1),        # K not a multiple of the 16-byte chunk
    (1, 7, 33),
    (3, 5, 512),      # several chunks per lane, N not a multiple of the warps per block
    (16, 9, 100),
    (17, 24, 64),     # M > 16: torch._int_mm + epilogue kernel (or GEMV tiles with int_mm=False)
    (40, 10, 50),     # M > 16 with K % 16 != 0: GEMV tiles
    (2, 3, 2100),     # large K, few rows: two loads in flight per lane
])
@pytest.mark.parametrize("int_mm", [True, False])
def test_int8_linear(M, N, K, int_mm):
    w = torch.randn(N, K)
    wq, ws = ops.quantize_per_channel(w)
    assert torch.equal(wq, quantize_symmetric_reference(w)[0]) and torch.equal(ws, quantize_symmetric_reference(w)[1])
    packed = ops.int8_pack_weight(wq)
    assert packed.dim() == 1 and torch.equal(ops.int8_unpack_weight(packed, N, K), wq)
    x, b = torch.randn(M, K), torch.randn(N)
    qx, sx = quantize_symmetric_reference(x)
    acc = qx.long() @ wq.long().T
    assert torch.equal(ops.int8_gemm_s32(qx, wq, int_mm).long(), acc)
    for bias in (b, None):
        y = ops.int8_linear(x, packed, ws, bias, int_mm=int_mm)
        # the CPU op's epilogue, in fp32: fma(float(acc), s_x * s_w, bias)
        sc = sx[:, None] * ws[None]
        ref = acc.float() * sc + (bias if bias is not None else 0)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        yo = ops.int8_weight_only_linear(x, packed, ws, bias, int_mm)
        refo = x.double() @ (wq.double() * ws.double()[:, None]).T + (bias.double() if bias is not None else 0)
        torch.testing.assert_close(yo.double(), refo, rtol=1e-5, atol=1e-5)
        cpu_packed = torch.ops.fastdistill.int8_pack_weight(wq)
        y_cpu = torch.ops.fastdistill.int8_linear(x, cpu_packed, ws, bias)
        assert torch.equal(y, y_cpu)  # bit-identical: same quantisation, exact int32 sums, same epilogue
        yo_cpu = torch.ops.fastdistill.int8_weight_only_linear(x, cpu_packed, ws, bias)
        torch.testing.assert_close(yo, yo_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,K", [(3, 37, 50), (17, 24, 64), (40, 10, 50)])  # GEMV tiles, _int_mm + epilogue
@pytest.mark.parametrize("int_mm", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
def test_int8_linear_activation_epilogue_matches_cpu(M, N, K, int_mm, activation, out_dtype):
    # The GPU kernels' epilogue (bias, then the activation in fp32, then the output dtype) is the CPU op's, bit for bit.
    wq, ws = ops.quantize_per_channel(torch.randn(N, K))
    packed, cpu_packed = ops.int8_pack_weight(wq), torch.ops.fastdistill.int8_pack_weight(wq)
    x, b = torch.randn(M, K) * 2, torch.randn(N)
    for bias in (b, None):
        y = ops.int8_linear(x, packed, ws, bias, activation, out_dtype, int_mm=int_mm)
        y_cpu = torch.ops.fastdistill.int8_linear(x, cpu_packed, ws, bias, activation, out_dtype)
        assert y.dtype == (out_dtype or x.dtype) and torch.equal(y, y_cpu)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: activation must be"):
        ops.int8_linear(x, packed, ws, None, "swish")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_dtypes_and_batch_shape(dtype):
    w = torch.randn(12, 48)
    wq, ws = ops.quantize_per_channel(w.to(dtype))
    packed = ops.int8_pack_weight(wq)
    x = torch.randn(2, 3, 48).to(dtype)
    b = torch.randn(12).to(dtype)
    y = ops.int8_linear(x, packed, ws, b)
    assert y.shape == (2, 3, 12) and y.dtype == dtype
    qx, sx = quantize_symmetric_reference(x.reshape(6, 48))
    ref = ((qx.long() @ wq.long().T).float() * (sx[:, None] * ws[None]) + b.float()).to(dtype).view(2, 3, 12)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    yo = ops.int8_weight_only_linear(x, packed, ws, b)
    refo = (x.double() @ (wq.double() * ws.double()[:, None]).T + b.double())
    torch.testing.assert_close(yo.double(), refo, rtol=1e-2, atol=1e-2)


def test_int8_errors():
    wq, ws = ops.quantize_per_channel(torch.randn(8, 32))
    packed = ops.int8_pack_weight(wq)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: (.*)?" "w_packed has .* elements"):
        ops.int8_linear(torch.randn(2, 31), packed, ws, None)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: (.*)?" "bias must have shape"):
        ops.int8_linear(torch.randn(2, 32), packed, ws, torch.randn(7))
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: (.*)?" "x must be float32, bfloat16 or float16"):
        ops.int8_linear(torch.randn(2, 32).double(), packed, ws, None)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_gemm_s32: (.*)?" "x_int8 must have K=32"):
        ops.int8_gemm_s32(torch.zeros(2, 31, dtype=torch.int8), wq)


# ---------------------------------------------------------------------------------------------- 2:4


@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [
    (1, 1, 4),        # one group (K % 8 == 4: half-used meta byte)
    (1, 5, 36),       # K not a multiple of the 32-column chunk: element path
    (3, 9, 256),      # aligned: 16-byte packs
    (16, 6, 1028),
    (2, 3, 4096),     # large K, few rows, few threads per row
    (20, 7, 64),      # M > 16: decompress + dense GEMM (or GEMV tiles)
])
@pytest.mark.parametrize("dense_fallback", [True, False])
def test_sparse24_linear(vdtype, M, N, K, dense_fallback):
    w = torch.randn(N, K).to(vdtype)
    values, meta, pruned = compressed_2_4_sample(w)
    assert torch.equal(ops.sparse24_decompress(values, meta), pruned)
    pv, pm = ops.sparse24_pack(values, meta)
    x, b = torch.randn(M, K), torch.randn(N)
    for xdt in (torch.float32, torch.bfloat16):
        xx = x.to(xdt)
        y = ops.sparse24_linear(xx, pv, pm, b, dense_fallback)
        assert y.dtype == xdt and y.shape == (M, N)
        ref = xx.double() @ pruned.double().T + b.double()
        # Per element: one unit of the output dtype, plus K eps32 |x| |W|^T of fp32 sums (the dense fallback's
        # GEMM runs in the values' dtype: 4 eps of it instead) and the bias add.
        mag = xx.double().abs() @ pruned.double().abs().T + b.double().abs()
        sums = 4 * torch.finfo(vdtype).eps if dense_fallback and M > 16 else K * torch.finfo(torch.float32).eps
        bound = torch.finfo(xdt).eps * ref.abs() + sums * mag + 1e-30
        assert ((y.double() - ref).abs() <= bound).all(), ((y.double() - ref).abs() - bound).max()
        y_cpu = torch.ops.fastdistill.sparse24_linear(xx, values, meta, b)
        assert ((y.double() - y_cpu.double()).abs() <= 2 * bound).all()


@pytest.mark.parametrize("M,N,K", [(1, 3, 12), (4, 9, 64), (16, 5, 1024), (20, 8, 64), (18, 3, 36)])
@pytest.mark.parametrize("dense_fallback", [True, False])
def test_sparse24_int8_linear(M, N, K, dense_fallback):
    wq, ws = ops.quantize_per_channel(torch.randn(N, K))
    values, meta, pruned = compressed_2_4_sample(wq)
    x, b = torch.randn(M, K), torch.randn(N)
    qx, sx = quantize_symmetric_reference(x)
    acc = qx.long() @ pruned.long().T
    for bias in (b, None):
        y = ops.sparse24_int8_linear(x, values, meta, ws, bias, dense_fallback)
        # the CPU op's epilogue in fp32: float(acc) * (s_x * s_w) + bias
        ref = acc.float() * (sx[:, None] * ws[None]) + (bias if bias is not None else 0)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        if not (dense_fallback and M > 16):
            # same exact int32 sums; the CPU's SIMD epilogues may fuse the multiply-add (1 ulp)
            y_cpu = torch.ops.fastdistill.sparse24_int8_linear(x, values, meta, ws, bias)
            torch.testing.assert_close(y, y_cpu, rtol=1e-6, atol=1e-6)


def test_sparse24_errors():
    values, meta, _ = compressed_2_4_sample(torch.randn(4, 16))
    with pytest.raises(RuntimeError, match=r"^fastdistill\.sparse24_linear: (.*)?" "K \\(x.size\\(-1\\)\\) to be a multiple of 4"):
        ops.sparse24_linear(torch.randn(2, 15), values, meta, None)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.sparse24_linear: (.*)?" "values must be \\[N, K/2\\]"):
        ops.sparse24_linear(torch.randn(2, 32), values, meta, None)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.sparse24_linear: (.*)?" "meta must be uint8"):
        ops.sparse24_linear(torch.randn(2, 16), values, meta.to(torch.int8), None)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.sparse24_int8_linear: (.*)?" "values must be int8"):
        ops.sparse24_int8_linear(torch.randn(2, 16), values, meta, torch.ones(4), None)


# ---------------------------------------------------------------- vocab-parallel shard kernels (fastdistill.distributed)
def logits(rows, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 4


def _close_partial(got, want, kl):
    """kd_loss_partial's [rows, 8] states: maxima and the centre's logit exact, sums to fp32 summation order. JSD keeps
    no weighted sum (its second pass does that work), so w and q_at are compared for the KL divergences only."""
    for col in (0, 2, 6) if kl else (0, 2):  # m_t, m_s, q_at
        assert torch.equal(got[:, col], want[:, col]), col
    for col in (1, 3, 4):  # z_t, z_s, z_h
        torch.testing.assert_close(got[:, col], want[:, col], rtol=2e-5, atol=1e-30)
    if not kl:
        return
    # w: a sum of e^u (log ratio), whose terms cancel; its scale is z_P times the log ratios' spread
    scale = want[:, 1].abs() + want[:, 3].abs() + want[:, 5].abs()
    assert ((got[:, 5] - want[:, 5]).abs() <= 1e-5 * scale).all()


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("rows,V,threads,splits", [(3, 1271, 64, 1), (2, 5000, 32, 3), (4, 37, 0, 0), (1, 70001, 0, 0)])
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=str)
def test_kd_partial_state_matches_cpu(div, rows, V, threads, splits, sdt):
    s, t = logits(rows, V, seed=1).to(sdt), logits(rows, V, seed=2)
    s[:, ::5] = t[:, ::5] = float("-inf")  # masked columns (on both sides: every divergence stays finite)
    labels = torch.randint(0, V, (rows,))
    args = (labels, 2.0, div, 0.3, -100, 4.0, 0.5)  # a hard term at T = 2: the separate T = 1 sum too
    got = ops.kd_loss_partial(s, t, *args, threads=threads, splits=splits)
    _close_partial(got, torch.ops.fastdistill.kd_loss_partial(s, t, *args), kl=div != "jsd")


@pytest.mark.parametrize("rows,V,threads,splits", [(3, 1271, 64, 1), (2, 5000, 32, 3), (4, 37, 0, 0)])
@pytest.mark.parametrize("sdt", [torch.float32, torch.float16], ids=str)
def test_kd_jsd_sums_match_cpu(rows, V, threads, splits, sdt):
    s, t = logits(rows, V, seed=1).to(sdt), logits(rows, V, seed=2)
    _, stats = torch.ops.fastdistill.kd_loss_forward(s, t, None, 2.0, "jsd", 0.3, -100, 4.0, 0.0)
    got = ops.kd_loss_jsd_sums(s, t, stats, 2.0, 0.3, threads=threads, splits=splits)
    want = torch.ops.fastdistill.kd_loss_jsd_sums(s, t, stats, 2.0, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the two sums over the whole row are the forward's JSD: beta KL(p||M) + (1 - beta) KL(q||M)
    rows_loss, _ = torch.ops.fastdistill.kd_loss_forward(s, t, None, 2.0, "jsd", 0.3, -100, 1.0, 0.0)
    torch.testing.assert_close(0.3 * got[:, 0] + 0.7 * got[:, 1], rows_loss, rtol=1e-4, atol=1e-6)


def test_kd_shard_ops_errors():
    s, t = logits(5, 37), logits(5, 37, seed=1)
    with pytest.raises(RuntimeError, match="fastdistill.kd_loss_jsd_sums: stats must be float32 \\[5, 8\\]"):
        ops.kd_loss_jsd_sums(s, t, torch.zeros(5, 7), 2.0, 0.3)
    with pytest.raises(RuntimeError, match="fastdistill.kd_loss_jsd_sums: beta must be in \\(0, 1\\)"):
        ops.kd_loss_jsd_sums(s, t, torch.zeros(5, 8), 2.0, 0.0)
    with pytest.raises(RuntimeError, match="fastdistill.kd_loss: student and teacher must have the same shape"):
        ops.kd_loss_partial(s, t[:, :-1], None, 2.0, "forward_kl", 0.5, -100, 1.0, 0.0)

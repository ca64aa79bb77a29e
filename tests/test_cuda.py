"""The CUDA ops on a real GPU (skipped without one): against the fp64 references and the CPU ops, opcheck,
torch.compile(fullgraph=True). The same kernels are exercised without a GPU by tests/test_simt.py."""
import pytest
import torch

import fastdistill
from fastdistill import ops
from fastdistill.reference import (compressed_2_4_sample, kd_loss_reference, kd_reverse_kl_grad_reference,
                                   quantize_symmetric_reference, sparse24_linear_reference)

from bounds import assert_epilogue_rounding_only

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdistill::{op}", "CUDA")


@pytest.fixture(autouse=True)
def _need_cuda_build():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _has_cuda_kernel("kd_loss_forward"):
        pytest.fail("a CUDA device is present but fastdistill was built without CUDA kernels "
                    "(rebuild with FASTDISTILL_CUDA=1 CUDA_HOME=/usr/local/cuda)")


# ------------------------------------------------------------------------------------------ kd_loss
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("div,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,V", [(3, 1), (3, 127), (3, 32001), (64, 4096), (3, 128256)])
def test_kd_loss_vs_reference(div, beta, dtype, rows, V, reduction):
    """Every reduction, a masked vocabulary tail (shared by student and teacher) and at least two live rows,
    against fp64: the loss within 2x plain fp32 PyTorch on the upcast inputs (plus 1e-5 relative: the kernels'
    fast exp), gradients per element (fp32: 2x plain fp32 plus the same floor; 16-bit: one unit of the dtype)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(rows, V, device="cuda", generator=g) * 3).to(dtype)
    t = (torch.randn(rows, V, device="cuda", generator=g) * 3).to(dtype)
    if V > 8:
        s[:, -V // 8:] = float("-inf")
        t[:, -V // 8:] = float("-inf")
    lab = torch.randint(0, V - V // 8 if V > 8 else V, (rows,), device="cuda", generator=g)
    lab[0] = -100  # rows 1.. stay live
    kw = dict(temperature=2.0, divergence=div, beta=beta, labels=lab, hard_weight=0.5, reduction=reduction)
    runs = []
    for fn, x in ((fastdistill.kd_loss, s.clone()), (kd_loss_reference, s.double()), (kd_loss_reference, s.float())):
        x.requires_grad_()
        loss = fn(x, t.to(x.dtype), **kw)
        grad_out = torch.linspace(0.3, 1.7, loss.numel(), device="cuda", dtype=loss.dtype).reshape(loss.shape)
        loss.backward(grad_out)
        runs.append((loss.detach().double(), x.grad.double()))
    (loss, grad), (ref, ref_grad), (plain, plain_grad) = runs
    assert (loss - ref).abs().max() <= 2 * (plain - ref).abs().max() + 1e-5 * (1 + ref.abs().max())
    base = 2 * (plain_grad - ref_grad).abs().max()
    if dtype == torch.float32:
        assert (grad - ref_grad).abs().max() <= base + 1e-5 * (1 + ref_grad.abs().max())
    else:
        info = torch.finfo(dtype)
        bound = info.eps * ref_grad.abs() + info.eps * info.smallest_normal + base + 1e-6 * (1 + ref_grad.abs().max())
        assert ((grad - ref_grad).abs() <= bound).all()


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_peaked_softmax_loses_nothing_to_cancellation(div):
    """|logits| / T ~ 1e4: within 2x plain float32 PyTorch's error on the GPU, no floor (tests/test_kd_loss.py's
    test of the same name explains the float64 truth)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5000, generator=g) * 9000, torch.randn(6, 5000, generator=g) * 9000
    kw = dict(temperature=2.0, divergence=div, beta=0.3, reduction="sum")

    def run(fn, dtype, device):
        x = s.to(device, dtype).requires_grad_()
        loss = fn(x, t.to(device, dtype), **kw)
        loss.backward(torch.tensor(0.37, dtype=dtype, device=device))
        return loss.detach().double().cpu(), x.grad.double().cpu()

    ref_loss, ref_grad = run(kd_loss_reference, torch.float64, "cpu")
    plain_loss, plain_grad = run(kd_loss_reference, torch.float32, "cuda")
    loss, grad = run(fastdistill.kd_loss, torch.float32, "cuda")
    if div == "reverse_kl":
        ref_grad = 0.37 * kd_reverse_kl_grad_reference(s, t, 2.0)
    assert (loss - ref_loss).abs() <= 2 * (plain_loss - ref_loss).abs()
    assert (grad - ref_grad).abs().max() <= 2 * (plain_grad - ref_grad).abs().max()


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_matches_cpu_op(div):
    s, t = torch.randn(5, 3001, dtype=torch.bfloat16), torch.randn(5, 3001)
    lab = torch.randint(0, 3001, (5,))
    args = (lab, 1.5, div, 0.4, -100, 2.25, 0.3)
    loss_c, stats_c = torch.ops.fastdistill.kd_loss_forward(s, t, *args)
    loss_g, stats_g = torch.ops.fastdistill.kd_loss_forward(s.cuda(), t.cuda(), lab.cuda(), *args[1:])
    torch.testing.assert_close(loss_g.cpu(), loss_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats_g.cpu(), stats_c, rtol=1e-5, atol=1e-5)
    g = torch.rand(5)
    grad_c = torch.ops.fastdistill.kd_loss_backward(g, s, t, lab, stats_c, *args[1:])
    grad_g = torch.ops.fastdistill.kd_loss_backward(g.cuda(), s.cuda(), t.cuda(), lab.cuda(), stats_g, *args[1:])
    torch.testing.assert_close(grad_g.cpu().float(), grad_c.float(), rtol=1e-2, atol=1e-5)


def test_kd_loss_noncontiguous_and_stream():
    """Non-contiguous inputs, on a side stream: the op must launch on the current stream. The default stream
    is kept busy (a sleep kernel, queued after the side stream's wait for the inputs) while the side stream's
    result is read. Had the op launched on the default stream, the read would see an unwritten output, or
    (if the op synchronised the device) find the default stream idle."""
    base = torch.randn(4, 9, 1000, device="cuda")
    s, t = base[:, :-1], torch.randn(4, 9, 1000, device="cuda")[:, 1:]
    ref = kd_loss_reference(s.double(), t.double(), temperature=2.0, reduction="none")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # s and t were written on the default stream
    # A first call: its setup, and memory cached for this stream (no cudaMalloc below). Other inputs (t, s),
    # so that what this leaves in the memory the second call reuses is not the expected loss.
    with torch.cuda.stream(side):
        fastdistill.kd_loss(t, s, temperature=2.0, reduction="none")
    side.synchronize()
    torch.cuda._sleep(1_000_000_000)  # about half a second of the default stream
    with torch.cuda.stream(side):
        loss = fastdistill.kd_loss(s, t, temperature=2.0, reduction="none")
        got = loss.cpu()  # waits for the side stream alone
    default_still_busy = not torch.cuda.default_stream().query()
    torch.cuda.synchronize()
    torch.testing.assert_close(got.double(), ref.cpu(), rtol=1e-5, atol=1e-5)
    assert default_still_busy, "the side stream's result waited for the default stream"


def test_kd_loss_opcheck():
    s, t = torch.randn(4, 513, device="cuda", requires_grad=True), torch.randn(4, 513, device="cuda")
    lab = torch.randint(0, 513, (4,), device="cuda")
    torch.library.opcheck(torch.ops.fastdistill.kd_loss_forward, (s, t, lab, 2.0, "jsd", 0.3, -100, 4.0, 0.5))
    loss, stats = torch.ops.fastdistill.kd_loss_forward(s.detach(), t, lab, 2.0, "jsd", 0.3, -100, 4.0, 0.5)
    torch.library.opcheck(torch.ops.fastdistill.kd_loss_backward,
                          (torch.rand(4, device="cuda"), s.detach(), t, lab, stats, 2.0, "jsd", 0.3, -100, 4.0, 0.5))


def test_kd_loss_compile():
    s = torch.randn(8, 2000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(8, 2000, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda a, b: fastdistill.kd_loss(a, b, temperature=2.0, divergence="reverse_kl"), fullgraph=True)
    out = f(s, t)
    out.backward()
    x = s.detach().clone().requires_grad_()
    ref = fastdistill.kd_loss(x, t, temperature=2.0, divergence="reverse_kl")
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s.grad, x.grad)


def test_kd_loss_errors_cuda():
    s = torch.randn(2, 10, device="cuda")
    with pytest.raises(RuntimeError, match=r"^fastdistill\.kd_loss: student and teacher must have the same shape"):
        ops.kd_loss_forward(s, torch.randn(2, 11, device="cuda"), None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.kd_loss: student and teacher must be on the same device"):
        ops.kd_loss_forward(s, s.cpu(), None, 1.0, "forward_kl", 0.5, -100, 1.0, 0.0)


def test_device_mismatch_reaches_the_cuda_checks():
    """A real CUDA x with CPU weights dispatches to the CUDA kernels, whose checks name the op and the tensor."""
    x = torch.randn(3, 64, device="cuda")
    q, s = ops.quantize_per_channel(torch.randn(8, 64))
    packed = ops.int8_pack_weight(q.cuda())
    for what, args in [("w_scales", (x, packed, s, None)), ("bias", (x, packed, s.cuda(), torch.zeros(8)))]:
        with pytest.raises(RuntimeError, match=rf"^fastdistill\.int8_linear: {what} must be on x's device"):
            torch.ops.fastdistill.int8_linear(*args)
    values, meta, _ = compressed_2_4_sample(torch.randn(8, 64))
    for what, args in [("values", (x, values, meta.cuda(), None)), ("meta", (x, values.cuda(), meta, None))]:
        with pytest.raises(RuntimeError, match=rf"^fastdistill\.sparse24_linear: {what} must be on x's device"):
            torch.ops.fastdistill.sparse24_linear(*args)


# --------------------------------------------------------------------------------------------- int8
def _int8_ops_built():
    try:
        return _has_cuda_kernel("int8_linear")
    except RuntimeError:  # schema not in this build
        return False




@pytest.mark.parametrize("M", [1, 3, 16, 17, 128])
@pytest.mark.parametrize("K,N", [(33, 7), (4096, 4096), (1000, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_cuda(M, K, N, dtype):
    if not _int8_ops_built():
        pytest.skip("int8 schemas not in this build")
    ops8 = torch.ops.fastdistill
    w = torch.randn(N, K, device="cuda")
    wq, ws = ops8.quantize_per_channel(w)
    wq_c, ws_c = ops8.quantize_per_channel(w.cpu())
    assert torch.equal(wq.cpu(), wq_c) and torch.equal(ws.cpu(), ws_c)
    packed = ops8.int8_pack_weight(wq)
    assert torch.equal(ops8.int8_unpack_weight(packed, N, K), wq)
    x = torch.randn(M, K, device="cuda").to(dtype)
    b = torch.randn(N, device="cuda")
    y = ops8.int8_linear(x, packed, ws, b)
    y_cpu = ops8.int8_linear(x.cpu(), ops8.int8_pack_weight(wq_c), ws_c, b.cpu())
    torch.testing.assert_close(y.cpu().float(), y_cpu.float(), rtol=1e-5, atol=1e-5)  # same math, same rounding
    yo = ops8.int8_weight_only_linear(x, packed, ws, b)
    refo = x.double() @ (wq.double() * ws.double()[:, None]).T + b.double()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(yo.double(), refo, rtol=tol, atol=tol)
    qx, _ = quantize_symmetric_reference(x)
    assert torch.equal(ops8.int8_gemm_s32(qx, wq).long().cpu(), qx.long().cpu() @ wq.long().cpu().T)


@pytest.mark.parametrize("M", [3, 40])  # GEMV tiles, torch._int_mm + epilogue kernel
@pytest.mark.parametrize("activation", ["relu", "relu6", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
def test_int8_linear_activation_epilogue_cuda(M, activation, out_dtype):
    if not _int8_ops_built():
        pytest.skip("int8 schemas not in this build")
    ops8 = torch.ops.fastdistill
    wq, ws = ops8.quantize_per_channel(torch.randn(72, 256))
    x, b = torch.randn(M, 256) * 2, torch.randn(72)
    y = ops8.int8_linear(x.cuda(), ops8.int8_pack_weight(wq.cuda()), ws.cuda(), b.cuda(), activation, out_dtype)
    y_cpu = ops8.int8_linear(x, ops8.int8_pack_weight(wq), ws, b, activation, out_dtype)
    assert y.dtype == y_cpu.dtype
    # same epilogue; --use_fast_math may round the GELU's division and exp differently from the CPU's IEEE ones
    torch.testing.assert_close(y.cpu().float(), y_cpu.float(), rtol=1e-5 if y.dtype == torch.float32 else 1e-2,
                               atol=1e-5 if y.dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_equals_the_cpu_op(dtype):
    x = (torch.randn(5, 3, 1001) * 4).to(dtype)
    x[0, 1] = 0  # scale 0
    x[1, 0, :3] = torch.tensor([127.0, 2.5, -0.5])  # amax 127: ties round half to even
    q, s = torch.ops.fastdistill.quantize_per_token(x.cuda())
    q_c, s_c = torch.ops.fastdistill.quantize_per_token(x)
    assert torch.equal(q.cpu(), q_c) and torch.equal(s.cpu(), s_c)


def test_int8_opcheck_and_compile_cuda():
    if not _int8_ops_built():
        pytest.skip("int8 schemas not in this build")
    ops8 = torch.ops.fastdistill
    wq, ws = ops8.quantize_per_channel(torch.randn(64, 128, device="cuda"))
    packed = ops8.int8_pack_weight(wq)
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(ops8.quantize_per_token, (x,))
    torch.library.opcheck(ops8.int8_pack_weight, (wq,))
    torch.library.opcheck(ops8.int8_linear, (x, packed, ws, None))
    torch.library.opcheck(ops8.int8_linear, (x, packed, ws, None, "gelu", torch.float32))
    torch.library.opcheck(ops8.int8_weight_only_linear, (x, packed, ws, None))
    f = torch.compile(lambda a: ops8.int8_linear(a, packed, ws, None), fullgraph=True)
    torch.testing.assert_close(f(x), ops8.int8_linear(x, packed, ws, None))


# ---------------------------------------------------------------------------------------------- 2:4
def _sparse_ops_built():
    try:
        return _has_cuda_kernel("sparse24_linear")
    except RuntimeError:
        return False




@pytest.mark.parametrize("M", [1, 5, 16, 64])
@pytest.mark.parametrize("K,N", [(36, 5), (4096, 4096), (1028, 24)])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse24_linear_cuda(M, K, N, vdtype):
    if not _sparse_ops_built():
        pytest.skip("2:4 schemas not in this build")
    ops4 = torch.ops.fastdistill
    values, meta, pruned = compressed_2_4_sample(torch.randn(N, K, device="cuda").to(vdtype))
    pv, pm = ops4.sparse24_pack(values, meta)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = ops4.sparse24_linear(x, pv, pm, None)
    ref = x.double() @ pruned.double().T
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)


def test_sparse24_int8_and_opcheck_cuda():
    if not _sparse_ops_built():
        pytest.skip("2:4 schemas not in this build")
    ops4 = torch.ops.fastdistill
    wq, ws = ops4.quantize_per_channel(torch.randn(32, 256, device="cuda"))
    values, meta, pruned = compressed_2_4_sample(wq)
    x = torch.randn(3, 256, device="cuda")
    y = ops4.sparse24_int8_linear(x, values, meta, ws, None)
    y_cpu = ops4.sparse24_int8_linear(x.cpu(), values.cpu(), meta.cpu(), ws.cpu(), None)
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(ops4.sparse24_linear, (x, values.float(), meta, None))
    torch.library.opcheck(ops4.sparse24_int8_linear, (x, values, meta, ws, None))
    f = torch.compile(lambda a: ops4.sparse24_int8_linear(a, values, meta, ws, None), fullgraph=True)
    torch.testing.assert_close(f(x), y)


@pytest.mark.parametrize("M", [1, 5, 16, 64])
@pytest.mark.parametrize("K,N", [(256, 32), (1028, 24), (4096, 4096)])
@pytest.mark.parametrize("xdtype", DTYPES)
def test_sparse24_int8_linear_cuda_vs_exact_scheme(M, K, N, xdtype):
    """Both CUDA paths (the GEMV up to 16 rows, decompress + torch._int_mm above) against the exact result of the
    scheme, per element: integer sums x activation scale x weight scale + bias, within the epilogue's roundings and
    one unit in the last place of the output dtype."""
    if not _sparse_ops_built():
        pytest.skip("2:4 schemas not in this build")
    ops4 = torch.ops.fastdistill
    wq, ws = ops4.quantize_per_channel(torch.randn(N, K))
    values, meta, _ = compressed_2_4_sample(wq)
    bias = torch.randn(N) * 4  # large enough that a dropped bias cannot hide in the tolerance
    x = torch.randn(M, K).to(xdtype)
    y = ops4.sparse24_int8_linear(x.cuda(), values.cuda(), meta.cuda(), ws.cuda(), bias.cuda())
    assert y.dtype == xdtype and y.shape == (M, N)
    ref = sparse24_linear_reference(x, values, meta, bias, w_scales=ws, dtype=torch.float64)
    assert_epilogue_rounding_only(y.cpu(), ref, bias, xdtype)


@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
@pytest.mark.parametrize("shape", [(64,), (3, 40)])
def test_sparse_linear_semi_structured_cuda(backend, shape):
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("this torch has no cuSPARSELt")
    lin = torch.nn.Linear(256, 128).cuda().bfloat16()
    with torch.no_grad():
        lin.bias.normal_(0, 4)  # Linear's default |bias| <= 1/16 would vanish inside the tolerance
    layer = fastdistill.SparseLinear.from_dense(lin)
    layer.semi_structured_backend = backend
    x = torch.randn(*shape, 256, device="cuda", dtype=torch.bfloat16)
    assert layer._semi_structured_applies(x)
    y = layer(x)
    ref = x.double() @ layer.to_dense().double().T + layer.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=5e-2)
    w = layer._semi_structured_weight()
    assert layer._semi_structured_weight() is w  # built once, reused
    layer.values.mul_(2)  # in-place change: the cached layout is rebuilt
    ref2 = x.double() @ layer.to_dense().double().T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), ref2, rtol=2e-2, atol=1e-1)
    assert layer._semi_structured_weight() is not w
    layer.semi_structured_backend = None  # the op's own path gives the same product
    torch.testing.assert_close(layer(x).double(), ref2, rtol=2e-2, atol=1e-1)

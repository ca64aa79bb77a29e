"""2:4 structured sparsity: format, conversions, kernels (every dtype and ISA path), modules, fine-tuning."""
import io
import re
import warnings

import pytest
import torch
import torch.nn as nn

import fastdistill as fd
from fastdistill import ops
from fastdistill.reference import quantize_symmetric_reference, sparse24_linear_reference
from fastdistill.sparse import SparseInt8Linear

from bounds import assert_epilogue_rounding_only

KS = [4, 8, 12, 100, 4100]
NS = [1, 3, 17]
MS = [1, 2, 5, 64]


def _is_2_4(w):
    g = (w.reshape(-1, w.shape[-1] // 4, 4) != 0).sum(-1)
    return bool((g <= 2).all())


def _sparse(n, k, dtype=torch.float32):
    w = torch.randn(n, k)
    values, meta = fd.compress_2_4(w)
    return values.to(dtype), meta


def _int8_values(n, k):
    values, meta = _sparse(n, k)
    scales = values.abs().amax(1) / 127
    q = torch.round(values / scales.clamp_min(1e-12).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, meta, scales


def _tol(y, y64, plain):
    """flash-attention rule: kernel error <= 2x the plain-PyTorch error in the same dtype + a floor."""
    err = (y.double() - y64).abs().max().item()
    ref_err = (plain.double() - y64).abs().max().item()
    assert err <= 2 * ref_err + 1e-5 * max(1.0, y64.abs().max().item()), (err, ref_err)


# ---------------------------------------------------------------- format
@pytest.mark.parametrize("k", KS)
def test_round_trip(k):
    w = torch.randn(5, k)
    mask = fd.prune_2_4(w)
    assert mask.sum().item() == w.numel() // 2
    values, meta = fd.compress_2_4(w, mask)
    assert values.shape == (5, k // 2) and meta.shape == (5, (k + 7) // 8) and meta.dtype == torch.uint8
    assert torch.equal(fd.decompress_2_4(values, meta), w * mask)
    if k % 8 == 4:
        assert bool(((meta[:, -1] >> 4) == 0).all())


def test_format_details():
    # columns 1, 3 kept in group 0; columns 4, 6 in group 1 -> codes 1|3<<2 = 13, 0|2<<2 = 8
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0]])
    values, meta = fd.compress_2_4(w)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert meta.tolist() == [[13 | (8 << 4)]]
    # groups with fewer than 2 nonzeros name 2 positions and store zeros
    w = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values, meta = fd.compress_2_4(w, w != 0)
    assert torch.equal(fd.decompress_2_4(values, meta), w)
    codes = [meta[0, 0].item() & 15, meta[0, 0].item() >> 4]
    assert all((c & 3) < (c >> 2) for c in codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prune_scores_and_bf16(dtype):
    w = torch.randn(8, 16).to(dtype)
    scores = torch.rand(8, 16)
    mask = fd.prune_2_4(w, scores)
    top = scores.reshape(8, 4, 4).topk(2, -1).indices
    assert torch.equal(mask.reshape(8, 4, 4), torch.zeros(8, 4, 4, dtype=torch.bool).scatter_(-1, top, True))
    values, meta = fd.compress_2_4(w, mask)
    assert values.dtype == dtype
    assert torch.equal(fd.decompress_2_4(values, meta), w * mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_cutlass_parity(dtype):
    from torch.sparse._semi_structured_conversions import (sparse_semi_structured_from_dense_cutlass,
                                                           sparse_semi_structured_to_dense_cutlass)
    w = torch.randn(64, 128) * 50
    w = w.to(dtype)
    values, meta = fd.compress_2_4(w)
    dense = fd.decompress_2_4(values, meta)
    sparse_c, meta_c = fd.to_cutlass_2_4(values, meta)
    ref_sparse, ref_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(sparse_c, ref_sparse) and torch.equal(meta_c, ref_meta)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(sparse_c, meta_c), dense)
    v2, m2 = fd.from_cutlass_2_4(sparse_c, meta_c)
    assert torch.equal(fd.decompress_2_4(v2, m2), dense)


def test_cutlass_refuses_float32():
    values, meta = fd.compress_2_4(torch.randn(32, 64))
    with pytest.raises(TypeError, match=r"^fastdistill\.to_cutlass_2_4: .*float32 is 1:2"):
        fd.to_cutlass_2_4(values, meta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_semi_structured_tensor_from_our_conversion(dtype):
    # The CUDA large-M path of SparseLinear multiplies this tensor; its layout is checked here on CPU.
    from torch.sparse import semi_structured as ss
    values, meta = fd.compress_2_4(torch.randn(64, 128).to(dtype))
    t = fd.to_semi_structured_2_4(values, meta, "cutlass")
    assert isinstance(t, ss.SparseSemiStructuredTensorCUTLASS) and t.shape == (64, 128) and t.dtype == dtype
    assert torch.equal(t.to_dense(), fd.decompress_2_4(values, meta))
    assert type(fd.to_semi_structured_2_4(values, meta)) is ss.SparseSemiStructuredTensorCUTLASS  # auto, on CPU
    with pytest.raises(ValueError, match=r"^fastdistill\.to_semi_structured_2_4: backend must be"):
        fd.to_semi_structured_2_4(values, meta, "cublas")
    with pytest.raises(ValueError, match=r"^fastdistill\.to_semi_structured_2_4: backend 'cusparselt' needs CUDA tensors"):
        fd.to_semi_structured_2_4(values, meta, "cusparselt")
    with pytest.raises(TypeError, match=r"^fastdistill\.to_semi_structured_2_4: values must be bfloat16, float16 or int8.*float32"):
        fd.to_semi_structured_2_4(values.float(), meta)
    with pytest.raises(ValueError, match=r"^fastdistill\.to_semi_structured_2_4: meta must be"):
        fd.to_semi_structured_2_4(values, meta[:, :-1])


def test_sparse_linear_semi_structured_only_on_cuda():
    from fastdistill.sparse.format import semi_structured_shape_ok as _semi_structured_shape_ok
    layer = fd.SparseLinear.from_dense(nn.Linear(128, 64).bfloat16())
    assert not layer._semi_structured_applies(torch.randn(64, 128, dtype=torch.bfloat16))  # CPU tensors
    assert "_semi_structured_cache" not in layer.__dict__
    assert _semi_structured_shape_ok(64, 128) and not _semi_structured_shape_ok(48, 128)
    assert not _semi_structured_shape_ok(64, 96) and not _semi_structured_shape_ok(0, 0)


# ---------------------------------------------------------------- kernels
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear(isa, k, dtype):
    for n in NS:
        values, meta = _sparse(n, k, dtype)
        bias = torch.randn(n).to(dtype)
        for m in MS if k < 4100 else [1, 5]:
            x = torch.randn(m, k).to(dtype)
            y = ops.sparse24_linear(x, values, meta, bias)
            assert y.dtype == dtype and y.shape == (m, n)
            y64 = sparse24_linear_reference(x.double(), values.double(), meta, bias.double())
            plain = sparse24_linear_reference(x, values, meta, bias)
            _tol(y, y64, plain)


@pytest.mark.parametrize("k", KS)
def test_int8_linear(isa, k):
    for n in NS:
        q, meta, scales = _int8_values(n, k)
        bias = torch.randn(n)
        for m in MS if k < 4100 else [1, 5]:
            for xdtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k).to(xdtype)
                y = ops.sparse24_int8_linear(x, q, meta, scales, bias)
                assert y.dtype == xdtype
                # the exact result of the same scheme: integer sums x activation scale x weight scale + bias
                y64 = sparse24_linear_reference(x, q, meta, bias, w_scales=scales, dtype=torch.float64)
                assert_epilogue_rounding_only(y, y64, bias, xdtype)


# Rows from which sparse24_int8_linear takes the decompress route (kInt8DenseRouteMinRows, csrc/cpu/sparse24_cpu.cpp);
# the shapes below straddle it.
INT8_DENSE_ROUTE_MIN_ROWS = 32


@pytest.mark.parametrize("k,n", [(4, 1), (100, 17), (260, 65), (1028, 131)])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_dense_route_bit_exact(isa, k, n, xdtype):
    """Above the crossover each row is computed by the dense int8 micro-kernel on unpacked panels; its integer sums
    and epilogue are the 2:4 kernels', so every row equals, bit for bit, the same row computed by the 2:4 kernel
    one row at a time. Below the crossover the blocked 2:4 kernel must agree with it too (one epilogue, never
    contracted into an FMA)."""
    q, meta, scales = _int8_values(n, k)
    c = INT8_DENSE_ROUTE_MIN_ROWS
    for with_bias in (False, True):
        bias = torch.randn(n) if with_bias else None
        # 5, 9, c - 1: the blocked 2:4 kernel (its remainder rows too); c and above: the route (97: a partial 96-row
        # chunk; 200: row chunks split across tasks)
        for m in (5, 9, c - 1, c, c + 1, 97, 200):
            x = (torch.randn(m, k) * 3).to(xdtype)
            y = ops.sparse24_int8_linear(x, q, meta, scales, bias)
            assert y.dtype == xdtype and y.shape == (m, n)
            rows = torch.cat([ops.sparse24_int8_linear(x[i:i + 1], q, meta, scales, bias) for i in range(m)])
            assert torch.equal(y, rows), (m, (y.double() - rows.double()).abs().max().item())
        y64 = sparse24_linear_reference(x, q, meta, bias, w_scales=scales, dtype=torch.float64)
        assert_epilogue_rounding_only(y, y64, bias, xdtype)


def test_int8_activation_quantization_edges(isa):
    k, n = 40, 5
    q, meta, scales = _int8_values(n, k)
    x = torch.zeros(3, k)
    x[1] = torch.randn(k) * 1e3
    x[2, 0] = 2.5 * (127 / 127)  # amax row with a tie at .5 after scaling
    y = ops.sparse24_int8_linear(x, q, meta, scales, None)
    assert torch.equal(y[0], torch.zeros(n))
    y64 = sparse24_linear_reference(x.double(), q, meta, None, w_scales=scales.double(), dtype=torch.float64)
    assert torch.allclose(y.double(), y64, rtol=1e-5, atol=1e-4)
    qx, s = quantize_symmetric_reference(torch.tensor([[0.5, -1.5, 2.5, 127.0]]))
    assert qx.tolist() == [[0, -2, 2, 127]]  # round half to even


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_and_mixed_dtypes(isa, dtype):
    values, meta = _sparse(6, 24, dtype)
    x = torch.randn(2, 3, 4, 24)
    y = ops.sparse24_linear(x, values, meta, None)
    assert y.shape == (2, 3, 4, 6) and y.dtype == torch.float32
    ref = sparse24_linear_reference(x.reshape(-1, 24).double(), values.double(), meta).reshape(2, 3, 4, 6)
    assert torch.allclose(y.double(), ref, atol=1e-4)
    xs = torch.randn(7, 48)[:, ::2]  # non-contiguous
    y = ops.sparse24_linear(xs, values, meta, None)
    assert torch.allclose(y.double(), sparse24_linear_reference(xs.double(), values.double(), meta), atol=1e-4)


def test_larger_m_blocked_path(isa):
    values, meta = _sparse(36, 1100)
    x = torch.randn(150, 1100)
    y = ops.sparse24_linear(x, values, meta, None)
    _tol(y, sparse24_linear_reference(x.double(), values.double(), meta),
         sparse24_linear_reference(x, values, meta))
    q, meta8, scales = _int8_values(36, 1100)
    y = ops.sparse24_int8_linear(x, q, meta8, scales, None)
    y64 = sparse24_linear_reference(x.double(), q, meta8, None, w_scales=scales.double(), dtype=torch.float64)
    assert (y.double() - y64).abs().max().item() <= 1e-5 * (y64.abs().max().item() + 1)


def test_isa_paths_agree():
    values, meta = _sparse(9, 100)
    x = torch.randn(5, 100)
    outs = []
    for isa in fd.isa.available_cpu_isas():
        with fd.cpu_isa(isa):
            outs.append(ops.sparse24_linear(x, values, meta, None))
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], atol=1e-5)


@pytest.mark.parametrize("m,n,k", [(40, 64, 256), (1, 1000, 512), (70, 333, 260), (3, 37, 100), (130, 800, 68)])
def test_thread_count_does_not_change_results(isa, m, n, k):
    values, meta = _sparse(n, k)
    q = values.clamp(-1, 1).mul(100).round().to(torch.int8)
    scales = torch.rand(n) + 0.5
    bias = torch.randn(n)
    x = torch.randn(m, k)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, max(2, prev), 3):
            torch.set_num_threads(threads)
            outs.append((ops.sparse24_linear(x, values, meta, bias),
                         ops.sparse24_int8_linear(x, q, meta, scales, bias)))
    finally:
        torch.set_num_threads(prev)
    for a, b in outs[1:]:
        assert torch.equal(a, outs[0][0])
        assert torch.equal(b, outs[0][1])


def test_opcheck():
    values, meta = _sparse(5, 24)
    x = torch.randn(3, 24)
    torch.library.opcheck(torch.ops.fastdistill.sparse24_linear.default, (x, values, meta, torch.randn(5)))
    torch.library.opcheck(torch.ops.fastdistill.sparse24_linear.default, (x.bfloat16(), values.bfloat16(), meta, None))
    q, meta8, scales = _int8_values(5, 24)
    torch.library.opcheck(torch.ops.fastdistill.sparse24_int8_linear.default, (x, q, meta8, scales, None))
    torch.library.opcheck(torch.ops.fastdistill.sparse24_pack.default, (values, meta))


def test_torch_compile():
    lin = nn.Linear(32, 12)
    sp = fd.SparseLinear.from_dense(lin)
    q = SparseInt8Linear.from_sparse(sp)
    x = torch.randn(2, 5, 32)
    for mod in (sp, q):
        compiled = torch.compile(mod, fullgraph=True)
        assert torch.allclose(compiled(x), mod(x))


# ---------------------------------------------------------------- modules
def test_sparse_linear_module(isa):
    lin = nn.Linear(40, 10)
    sp = fd.SparseLinear.from_dense(lin)
    w = sp.to_dense()
    assert _is_2_4(w) and torch.equal(w, lin.weight.detach() * fd.prune_2_4(lin.weight))
    x = torch.randn(3, 40)
    assert torch.allclose(sp(x), nn.functional.linear(x, w, lin.bias), atol=1e-5)
    assert set(sp.state_dict()) == {"values", "meta", "bias"}
    for dtype in (torch.bfloat16, torch.float16):
        low = fd.SparseLinear.from_dense(nn.Linear(40, 10, bias=False).to(dtype))
        assert low(x.to(dtype)).dtype == dtype and low.bias is None
        ref = nn.functional.linear(x.to(dtype).double(), low.to_dense().double())
        assert (low(x.to(dtype)).double() - ref).abs().max() < 0.02 * ref.abs().max()


def test_quantize_weight_only_leaves_sparse_layers_and_names_them():
    model = nn.Sequential(fd.SparseLinear.from_dense(nn.Linear(16, 8)), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"quantize_: left 1 layer\(s\) unconverted: 0 \(2:4 layers have no "
                                         r"weight_only int8 kernel"):
        fd.quantize_(model, mode="weight_only")
    assert isinstance(model[0], fd.SparseLinear) and isinstance(model[1], fd.Int8Linear)


def test_int8_module_and_state_dict():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    fd.sparsify_(model)
    assert all(isinstance(model[i], fd.SparseLinear) for i in (0, 2))
    x = torch.randn(4, 64)
    dense_out = model(x)
    fd.quantize_(model)
    assert isinstance(model[0], SparseInt8Linear) and isinstance(model[2], SparseInt8Linear)
    assert set(model[0].state_dict()) == {"values", "meta", "scales", "bias"}
    out = model(x)
    assert (out - dense_out).abs().max() < 0.05 * dense_out.abs().max() + 0.05
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = nn.Sequential(SparseInt8Linear(64, 32), nn.ReLU(), SparseInt8Linear(32, 8))
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), out)


def test_state_dict_round_trip_float():
    model = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 4))
    fd.sparsify_(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = nn.Sequential(fd.SparseLinear(12, 20), nn.GELU(), fd.SparseLinear(20, 4))
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), model(x))


def test_sparsify_skips_and_warns_once():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 10), nn.Linear(10, 3), nn.Linear(3, 4).half())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fd.sparsify_(model)
    msgs = [str(r.message) for r in rec if "sparsify_" in str(r.message)]
    assert len(msgs) == 1 and "1 (" in msgs[0] and "2 (" in msgs[0] and "3 (" in msgs[0]
    assert isinstance(model[0], fd.SparseLinear) and type(model[1]) is nn.Linear
    m2 = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fd.sparsify_(m2, filter_fn=lambda mod, name: name == "1")
    assert type(m2[0]) is nn.Linear and isinstance(m2[1], fd.SparseLinear)


# ---------------------------------------------------------------- mask-preserving fine-tuning
def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def _train(model, x, y, steps, loss_fn, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        i = torch.randint(0, len(y), (128,))
        opt.zero_grad()
        loss = loss_fn(model(x[i]), i)
        loss.backward()
        opt.step()


def test_mask_fine_tuning_recovers_with_kd():
    xtr, ytr, xte, yte = _digits()
    teacher = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    _train(teacher, xtr, ytr, 200, lambda out, i: nn.functional.cross_entropy(out, ytr[i]))
    teacher_acc = _acc(teacher, xte, yte)
    with torch.no_grad():
        teacher_logits = teacher(xtr)
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    student.load_state_dict(teacher.state_dict())
    handle = fd.apply_2_4_masks(student)
    pruned_acc = _acc(student, xte, yte)
    masks = [m.clone() for _, m in handle.layers]
    kd = fd.KDLoss(temperature=2.0, hard_weight=0.5)
    _train(student, xtr, ytr, 100, lambda out, i: kd(out, teacher_logits[i], labels=ytr[i]), lr=3e-3)
    tuned_acc = _acc(student, xte, yte)
    for (mod, _), mask in zip(handle.layers, masks):
        assert _is_2_4(mod.weight) and torch.equal(mod.weight != 0, mask & (mod.weight != 0))
        assert bool((mod.weight[~mask] == 0).all())
    handle.remove()
    assert tuned_acc > pruned_acc + 0.01 or tuned_acc >= teacher_acc - 0.01, (teacher_acc, pruned_acc, tuned_acc)
    # converting the fine-tuned model keeps exactly the fine-tuned weights
    fd.sparsify_(student)
    assert abs(_acc(student, xte, yte) - tuned_acc) < 1e-6


def test_sr_ste():
    xtr, ytr, xte, yte = _digits()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    handle = fd.apply_2_4_masks(model, sr_ste_decay=2e-4)
    _train(model, xtr, ytr, 60, lambda out, i: nn.functional.cross_entropy(out, ytr[i]))
    assert _is_2_4(model[0].weight)  # the forward's weight is 2:4 at every step
    handle.remove()
    assert _is_2_4(model[0].weight) and _is_2_4(model[2].weight)
    assert _acc(model, xte, yte) > 0.8


# ---------------------------------------------------------------- errors
def test_errors():
    def raises(exc, op, message):
        return pytest.raises(exc, match=rf"^fastdistill\.{re.escape(op)}: {message}")

    k4 = r"2:4 sparsity needs K \({}\) to be a multiple of 4, got K={}"
    with raises(ValueError, "SparseLinear.from_dense", k4.format(r"in_features, the number of columns", 10)):
        fd.SparseLinear.from_dense(nn.Linear(10, 4))
    with raises(ValueError, "SparseLinear", k4.format(r"in_features, the number of columns", 6)):
        fd.SparseLinear(6, 2)
    with raises(ValueError, "prune_2_4", k4.format(r"in_features, the number of columns", 6)):
        fd.prune_2_4(torch.randn(3, 6))
    with raises(ValueError, "compress_2_4", "mask is not 2:4: row 0, columns 0..3 keep 4 of 4"):
        fd.compress_2_4(torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool))
    with raises(ValueError, "compress_2_4", r"mask must have the weight's shape \[2, 8\], got \[2, 4\]"):
        fd.compress_2_4(torch.randn(2, 8), torch.ones(2, 4, dtype=torch.bool))
    values, meta = _sparse(3, 16)
    with raises(ValueError, "decompress_2_4", r"meta must be \[N, ceil\(K/8\)\] = \[3, 2\]"):
        fd.decompress_2_4(values, meta[:, :1])
    with raises(ValueError, "decompress_2_4", "meta must be uint8, got torch.int16"):
        fd.decompress_2_4(values, meta.to(torch.int16))
    bad = meta.clone()
    bad[0, 0] = 0x11  # idx0 == idx1
    with raises(ValueError, "decompress_2_4", "meta is invalid: row 0, group 0"):
        fd.decompress_2_4(values, bad)
    with raises(TypeError, "SparseLinear.from_dense", "the weight must be float32, bfloat16 or float16, got torch.float64"):
        fd.SparseLinear.from_dense(nn.Linear(8, 4).double())
    x = torch.randn(2, 16)
    with raises(RuntimeError, "sparse24_linear", k4.format(r"x.size\(-1\)", 18)):
        ops.sparse24_linear(torch.randn(2, 18), torch.randn(3, 9), torch.zeros(3, 3, dtype=torch.uint8), None)
    with raises(RuntimeError, "sparse24_linear", r"values must be \[N, K/2\] = \[3, 10\] to match x with K=20"):
        ops.sparse24_linear(torch.randn(2, 20), values, meta, None)
    with raises(RuntimeError, "sparse24_linear", r"meta must be \[N, ceil\(K/8\)\] = \[3, 2\], got \[3, 1\]"):
        ops.sparse24_linear(x, values, meta[:, :1], None)
    with raises(RuntimeError, "sparse24_linear", "meta must be uint8, got Char"):
        ops.sparse24_linear(x, values, meta.to(torch.int8), None)
    with raises(RuntimeError, "sparse24_linear", r"bias must be \[N\] = \[3\], got \[4\]"):
        ops.sparse24_linear(x, values, meta, torch.randn(4))
    with raises(RuntimeError, "sparse24_linear", "x must be float32, bfloat16 or float16, got Double"):
        ops.sparse24_linear(x.double(), values, meta, None)
    with raises(RuntimeError, "sparse24_linear", "values must be float32, bfloat16 or float16"):
        ops.sparse24_linear(x, values.to(torch.int8), meta, None)
    with raises(RuntimeError, "sparse24_int8_linear", "values must be int8, got Float"):
        ops.sparse24_int8_linear(x, values, meta, torch.ones(3), None)
    with raises(RuntimeError, "sparse24_int8_linear", r"w_scales must be float32 \[N\] = \[3\], got Float \[4\]"):
        ops.sparse24_int8_linear(x, values.to(torch.int8), meta, torch.ones(4), None)
    with raises(RuntimeError, "sparse24_pack", r"meta must be uint8 \[N, ceil\(K/8\)\] = \[3, 2\]"):
        ops.sparse24_pack(values, meta[:, :1])
    with raises(ValueError, "apply_2_4_masks", "sr_ste_decay must be >= 0, got -1.0"):
        fd.apply_2_4_masks(nn.Linear(8, 8), sr_ste_decay=-1.0)


@pytest.mark.parametrize("m,n,k", [(1, 1000, 516), (1, 203, 2056), (130, 800, 68), (200, 390, 260)])
def test_linear_many_tasks(isa, m, n, k):
    # several row blocks and column tasks (large-M task grid, M=1 GEMV over many tasks)
    values, meta = _sparse(n, k)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    y = ops.sparse24_linear(x, values, meta, bias)
    ref = x.double() @ fd.decompress_2_4(values, meta).double().T + bias.double()
    assert torch.allclose(y.double(), ref, atol=1e-4, rtol=1e-5)


_FORK_CHILD = r"""
import os, sys, torch
import fastdistill as fd
from fastdistill import ops
torch.set_num_threads(2)
w = torch.randn(512, 256)
values, meta = fd.compress_2_4(w)
x = torch.randn(64, 256)
expected = ops.sparse24_linear(x, values, meta, None)  # runs on the parent's OpenMP threads
for _ in range(3):
    pid = os.fork()
    if pid == 0:  # as a DataLoader worker: GNU OpenMP cannot run a parallel region in a forked child
        torch.set_num_threads(1)
        got = ops.sparse24_linear(x, values, meta, None)
        ok = torch.equal(got, expected) and torch.equal(torch.relu(x), x.clamp_min(0))
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(4)
print("ok")
"""


def test_ops_run_in_a_forked_child():
    """A forked child (a DataLoader worker, which sets one thread) runs the ops, with the same results as the
    parent. The 2:4 ops use ATen's thread pool, so they follow ATen's rule: GNU OpenMP cannot start a
    parallel region in a forked child, so the child sets torch.set_num_threads(1)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FORK_CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

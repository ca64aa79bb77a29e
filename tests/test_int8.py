"""int8 quantized inference: kernels (every CPU ISA path), modules, state_dict, accuracy, errors."""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdistill
from fastdistill import Int8Linear, ops, quantize_, quantize_per_channel, quantize_per_token
from fastdistill.isa import available_cpu_isas
from fastdistill.reference import (int8_linear_reference, int8_weight_only_linear_reference,
                                   quantize_symmetric_reference)

from bounds import assert_epilogue_rounding_only, assert_fp32_sum_rounding_only

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1), (3, 3, 17), (2, 17, 3), (7, 100, 33), (1, 4097, 100), (13, 64, 70), (130, 40, 129)]
BIG = [(9, 4500, 70), (100, 2500, 40)]  # several K slices (2048) and row chunks (96)


def _packed(n, k, dtype=torch.float32, bias=True):
    w = torch.randn(n, k, dtype=dtype)
    q, s = quantize_per_channel(w)
    b = torch.randn(n, dtype=dtype) if bias else None
    return w, q, s, ops.int8_pack_weight(q), b


# ---------------------------------------------------------------- integer-exact kernels
@pytest.mark.parametrize("m,k,n", SHAPES + BIG)
def test_gemm_s32_exact(isa, m, k, n):
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    ref = (x.long() @ w.long().T).to(torch.int32)
    assert torch.equal(ops.int8_gemm_s32(x, w), ref)


def test_gemm_s32_extremes_and_leading_dims(isa):
    k = 4097  # |sum| = 4097 * 127 * 128: far from int16, exact in int32
    x = torch.full((2, 3, k), -128, dtype=torch.int8)
    x[1] = 127
    w = torch.full((5, k), 127, dtype=torch.int8)
    w[1] = -127
    ref = (x.long() @ w.long().T).to(torch.int32)
    out = ops.int8_gemm_s32(x, w)
    assert out.shape == (2, 3, 5) and torch.equal(out, ref)


def test_pack_unpack_roundtrip():
    for n, k in [(1, 1), (17, 3), (33, 100)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        p = ops.int8_pack_weight(w)
        assert p.numel() == ops.int8_packed_numel(n, k, "cpu")
        assert torch.equal(ops.int8_unpack_weight(p, n, k), w)


# ---------------------------------------------------------------- quantisation
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_matches_reference(isa, dtype):
    x = torch.randn(4, 5, 37).to(dtype) * 3
    x[0, 1] = 0  # a zero row: scale 0, q 0
    x[1, 2, :4] = torch.tensor([127.0, 2.5, -0.5, 1.5])  # amax 127 -> s = 1: ties round half to even
    q, s = quantize_per_token(x)
    q_ref, s_ref = quantize_symmetric_reference(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (4, 5)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q[1, 2, :4].tolist() == [127, 2, 0, 2]
    assert (q[0, 1] == 0).all() and s[0, 1] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_channel_matches_reference(dtype):
    w = torch.randn(33, 100).to(dtype)
    w[3] = 0
    q, s = quantize_per_channel(w)
    q_ref, s_ref = quantize_symmetric_reference(w)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


# ---------------------------------------------------------------- int8_linear / weight-only
@pytest.mark.parametrize("m,k,n", SHAPES + BIG)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_vs_fp64_reference(isa, m, k, n, bias):
    _, q, s, p, b = _packed(n, k, bias=bias)
    x = torch.randn(m, k)
    y = ops.int8_linear(x, p, s, b)
    ref = int8_linear_reference(x, q, s, b)  # int32 accumulators x activation scale x weight scale + bias, in fp64
    assert_epilogue_rounding_only(y, ref, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_dtypes_leading_dims(isa, dtype):
    _, q, s, p, b = _packed(40, 70)
    x = (torch.randn(2, 3, 70) * 2).to(dtype)
    y = ops.int8_linear(x, p, s, b.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    ref = int8_linear_reference(x, q, s, b.to(dtype))
    assert_epilogue_rounding_only(y, ref, b.to(dtype), out_dtype=dtype)


def test_int8_linear_path_and_thread_independent():
    _, q, s, p, b = _packed(100, 300)
    x = torch.randn(200, 300)
    outs = []
    for isa in available_cpu_isas():
        with fastdistill.cpu_isa(isa):
            outs.append(ops.int8_linear(x, p, s, b))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        outs.append(ops.int8_linear(x, p, s, b))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("m,k,n", SHAPES + BIG)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_only_vs_fp64_reference(isa, m, k, n, dtype):
    _, q, s, p, b = _packed(n, k)
    x = torch.randn(m, k).to(dtype)
    y = ops.int8_weight_only_linear(x, p, s, b)
    assert y.dtype == dtype
    ref = int8_weight_only_linear_reference(x, q, s, b)
    # Tolerance rule: at most 2x the error of plain PyTorch in the same dtype, plus a floor ...
    wd = (q.float() * s[:, None]).to(dtype)
    plain = F.linear(x, wd, b.to(dtype)).double()
    err, err_plain = (y.double() - ref).abs().max(), (plain - ref).abs().max()
    assert err <= 2 * err_plain + 1e-5 * (ref.abs().max() + 1)
    # ... and per element, nothing beyond fp32 summation and the output's rounding.
    assert_fp32_sum_rounding_only(y, ref, x, q.double() * s.double()[:, None], b, dtype)


def test_k_zero(isa):
    p = ops.int8_pack_weight(torch.zeros(5, 0, dtype=torch.int8))
    b = torch.randn(5)
    for fn in (ops.int8_linear, ops.int8_weight_only_linear):
        torch.testing.assert_close(fn(torch.randn(3, 0), p, torch.ones(5), b), b.expand(3, 5), rtol=0, atol=0)
    assert torch.equal(ops.int8_gemm_s32(torch.zeros(2, 0, dtype=torch.int8), torch.zeros(5, 0, dtype=torch.int8)),
                       torch.zeros(2, 5, dtype=torch.int32))


def test_empty_batch():
    _, _, s, p, b = _packed(8, 16)
    assert ops.int8_linear(torch.randn(0, 16), p, s, b).shape == (0, 8)
    assert ops.int8_weight_only_linear(torch.randn(2, 0, 16), p, s, b).shape == (2, 0, 8)


# ---------------------------------------------------------------- accuracy vs F.linear and fbgemm
def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def test_accuracy_vs_fbgemm_with_outliers():
    torch.manual_seed(1)
    k, n, m = 512, 256, 64
    lin = nn.Linear(k, n)
    x_plain = torch.randn(m, k)
    x_out = x_plain.clone()
    x_out[:, [7, 100, 300]] *= 40  # a few outlier channels, as in transformer activations
    ours = Int8Linear.from_float(lin)
    ours_wo = Int8Linear.from_float(lin, mode="weight_only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
        fb_pc = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(lin), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
    report = {}
    for name, x in [("plain", x_plain), ("outliers", x_out)]:
        ref = F.linear(x, lin.weight, lin.bias)
        e = {"ours": _rel(ours(x), ref), "ours_wo": _rel(ours_wo(x), ref),
             "fbgemm": _rel(fb(x), ref), "fbgemm_per_channel": _rel(fb_pc(x), ref)}
        report[name] = e
        assert e["ours"] <= e["fbgemm"] and e["ours"] <= e["fbgemm_per_channel"], e
        assert e["ours_wo"] <= e["ours"], e
        assert e["ours"] < 0.05, e
    print("relative error vs fp32 F.linear:", report)


# ---------------------------------------------------------------- opcheck / compile
def test_opcheck():
    _, q, s, p, b = _packed(20, 36)
    x = torch.randn(3, 36)
    xq = torch.randint(-127, 128, (3, 36), dtype=torch.int8)
    cases = [
        (torch.ops.fastdistill.quantize_per_token, (x,)),
        (torch.ops.fastdistill.quantize_per_channel, (torch.randn(20, 36),)),
        (torch.ops.fastdistill.int8_pack_weight, (q,)),
        (torch.ops.fastdistill.int8_unpack_weight, (p, 20, 36)),
        (torch.ops.fastdistill.int8_linear, (x, p, s, b)),
        (torch.ops.fastdistill.int8_linear, (x.bfloat16(), p, s, None)),
        (torch.ops.fastdistill.int8_weight_only_linear, (x, p, s, b)),
        (torch.ops.fastdistill.int8_gemm_s32, (xq, q)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    quantize_(mlp)
    mlp2 = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    quantize_(mlp2, mode="weight_only")
    x = torch.randn(2, 5, 64)
    for m in (mlp, mlp2):
        compiled = torch.compile(m, fullgraph=True)
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- modules
class _MLP(nn.Module):
    def __init__(self, d=64, h=176):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), \
            nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.norm(x)
        h = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.head(h)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_quantize_transformer_mlp(mode):
    model = _MLP()
    x = torch.randn(2, 7, 64)
    ref = model(x)
    out = quantize_(model, mode=mode, filter_fn=lambda mod, fqn: fqn != "head")
    assert out is model
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(model, name), Int8Linear) and getattr(model, name).mode == mode
    assert type(model.head) is nn.Linear
    assert _rel(model(x), ref) < 0.03
    quantize_(model, mode=mode)
    assert isinstance(model.head, Int8Linear)
    y = model(x.bfloat16().float())
    assert y.shape == ref.shape and _rel(y, ref) < 0.05


def test_quantize_uses_the_converter_registry_and_exact_types():
    from fastdistill.convert import _CONVERTERS, register_converter

    class Custom(nn.Module):
        def forward(self, x):
            return x

    class LinearSubclass(nn.Linear):  # e.g. attention's out_proj: its owner reads .weight directly
        pass

    calls = []
    register_converter("quantize", Custom)(lambda mod, mode: calls.append(mode) or nn.Identity())
    try:
        model = nn.Sequential(Custom(), nn.Linear(4, 4), LinearSubclass(4, 4))
        quantize_(model, mode="weight_only")
    finally:
        del _CONVERTERS["quantize"][Custom]
    assert calls == ["weight_only"] and isinstance(model[0], nn.Identity)
    assert isinstance(model[1], Int8Linear) and type(model[2]) is LinearSubclass


def test_state_dict_contents_and_memory():
    lin = nn.Linear(33, 17)
    m = Int8Linear.from_float(lin)
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (17, 33)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (17,)
    q, s = quantize_per_channel(lin.weight.detach())
    assert torch.equal(sd["weight"], q) and torch.equal(sd["weight_scale"], s)
    # One resident copy of the weights: the packed buffer (no int8 [N, K] duplicate).
    assert [n for n, _ in m.named_buffers()] == ["w_packed", "weight_scale", "bias"]


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_state_dict_roundtrip_bit_identical(tmp_path, fmt, mode):
    model = _MLP()
    quantize_(model, mode=mode)
    x = torch.randn(3, 5, 64)
    y = model(x)
    fresh = _MLP()
    quantize_(fresh, mode=mode)
    if fmt == "torch":
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    else:
        import safetensors.torch as safetensors
        path = tmp_path / "model.safetensors"
        safetensors.save_file(model.state_dict(), str(path))
        sd = safetensors.load_file(str(path))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)


def test_to_device_and_dtype_repacks():
    m = Int8Linear.from_float(nn.Linear(20, 12))
    w = m.int8_weight()
    m.to("cpu")
    m.half()
    assert m.weight_scale.dtype == torch.float32 and torch.equal(m.int8_weight(), w)
    assert m(torch.randn(2, 20, dtype=torch.float16)).dtype == torch.float16


# ---------------------------------------------------------------- errors
def test_errors():
    _, q, s, p, b = _packed(16, 32)
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.quantize_per_channel: w must be 2-D"):
        quantize_per_channel(torch.randn(4))
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_pack_weight: w_int8 must be 2-D"):
        ops.int8_pack_weight(torch.zeros(2, 3, 4, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_gemm_s32: w_int8 must be 2-D"):
        ops.int8_gemm_s32(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(4, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: .*w_scales must have shape \[N\] = \[16\].*got \[15\]"):
        ops.int8_linear(x, p, s[:15], b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_weight_only_linear: .*w_scales must be 1-D"):
        ops.int8_weight_only_linear(x, p, s[None], b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: .*w_scales must be float32"):
        ops.int8_linear(x, p, s.half(), b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: x must have K=32 columns to match the weight, got 31"):
        ops.int8_linear(x[:, :31], p, s, b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_weight_only_linear: x must have K=32 columns"):
        ops.int8_weight_only_linear(torch.randn(2, 33), p, s, b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_gemm_s32: x_int8 must have K=32 columns"):
        ops.int8_gemm_s32(torch.zeros(2, 31, dtype=torch.int8), q)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: .*bias must have shape \[N\] = \[16\]"):
        ops.int8_linear(x, p, s, b[:3])
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(4, 8)
        w[2, 5] = bad
        with pytest.raises(RuntimeError, match=r"^fastdistill\.quantize_per_channel: w contains NaN or Inf"):
            quantize_per_channel(w)
        with pytest.raises(RuntimeError, match=r"NaN or Inf"):
            Int8Linear.from_float(_lin_with(w))
    # unsupported dtypes
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: x must be float32, bfloat16 or float16, got Double"):
        ops.int8_linear(x.double(), p, s, b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_weight_only_linear: x must be float32, bfloat16 or float16, got Int"):
        ops.int8_weight_only_linear(x.int(), p, s, b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.quantize_per_token: x must be float32, bfloat16 or float16, got Long"):
        quantize_per_token(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"^fastdistill\.quantize_per_channel: w must be float32, bfloat16 or float16, got Double"):
        quantize_per_channel(torch.ones(2, 3, dtype=torch.double))
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_pack_weight: w_int8 must be int8, got Float"):
        ops.int8_pack_weight(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_gemm_s32: x_int8 must be int8, got Float"):
        ops.int8_gemm_s32(torch.ones(2, 32), q)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: .*bias must be float32, bfloat16 or float16, got Long"):
        ops.int8_linear(x, p, s, torch.ones(16, dtype=torch.long))
    # The bound is int32 accumulation of u8 x s8 products, one constant of the extension (ops.int8_max_k).
    max_k = ops.int8_max_k()
    assert max_k * 255 * 127 < 2 ** 31
    with pytest.raises(RuntimeError, match=rf"^fastdistill\.int8_pack_weight: K must be at most {max_k}"):
        ops.int8_pack_weight(torch.zeros(1, max_k + 1, dtype=torch.int8))
    ops.int8_pack_weight(torch.zeros(1, max_k, dtype=torch.int8))
    # not a packed weight
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: .*w_packed must be a contiguous 1-D int8 tensor"):
        ops.int8_linear(x, q, s, b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: .*w_packed is not a CPU packed int8 weight"):
        ops.int8_linear(x, torch.zeros(p.numel(), dtype=torch.int8), s, b)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_unpack_weight: .*holds a \[16, 32\] weight, but N=16 K=31"):
        ops.int8_unpack_weight(p, 16, 31)
    # module-level
    with pytest.raises(ValueError, match=r"mode must be one of"):
        Int8Linear.from_float(nn.Linear(4, 4), mode="int4")
    with pytest.raises(TypeError, match=r"expected an nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(4, 4, 1))
    m = Int8Linear.from_float(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match=r"weight must be int8 of shape \[4, 8\]"):
        m.load_state_dict({"weight": torch.zeros(4, 7, dtype=torch.int8), "weight_scale": torch.ones(4),
                           "bias": torch.zeros(4)})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*weight"):
        m.load_state_dict({"weight_scale": torch.ones(4), "bias": torch.zeros(4)})


def _lin_with(w):
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin

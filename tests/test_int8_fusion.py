"""int8_linear's activation epilogue (every CPU ISA path) and the model-level fusions of quantize_(..., fuse=True):
Q/K/V as one GEMM and the FFN's GELU in the epilogue, on a tiny transformers BERT built from a config."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

import fastdistill
from fastdistill import Int8Linear, ops, quantize_, quantize_per_channel, sparsify_
from fastdistill.fusion import FusedQKV, fuse_int8_
from fastdistill.isa import available_cpu_isas
from fastdistill.reference import int8_linear_reference, quantize_symmetric_reference
from fastdistill.sparse.modules import SparseInt8Linear

SHAPES = [(1, 1, 1), (3, 17, 3), (14, 384, 1536), (7, 100, 33), (130, 40, 129), (9, 4500, 70)]
ACTS = [a for a in ops.INT8_ACTIVATIONS if a != "none"]


def _act64(name, y):
    # fp64 references without 1 + erf / 1 + tanh (which cancel to 0 below x = -8 even in fp64): x Phi(x) through
    # erfc, and the tanh form as x sigmoid(2u).
    y = y.double()
    if name == "gelu":
        return 0.5 * y * torch.special.erfc(-y / 2 ** 0.5)
    if name == "gelu_tanh":
        return y * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3))
    if name == "relu6":
        return y.clamp(0, 6)
    return torch.relu(y) if name == "relu" else y


def _packed(n, k, bias=True):
    q, s = quantize_per_channel(torch.randn(n, k))
    return q, s, ops.int8_pack_weight(q), torch.randn(n) if bias else None


# ---------------------------------------------------------------- the activation epilogue
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_activation_epilogue_vs_fp64(isa, m, k, n, act, out_dtype, bias):
    q, s, p, b = _packed(n, k, bias)
    x = torch.randn(m, k) * 3
    y = ops.int8_linear(x, p, s, b, act, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    ref = _act64(act, int8_linear_reference(x, q, s, b))  # the scheme's exact value, then the activation, in fp64
    # Tolerance rule: PyTorch's own act(F.linear) in the output dtype on the same dequantized operands.
    xq, xs = quantize_symmetric_reference(x)
    x_deq, w_deq = (xq.float() * xs[:, None]).to(out_dtype), (q.float() * s[:, None]).to(out_dtype)
    lin = F.linear(x_deq, w_deq, b.to(out_dtype) if bias else None)
    plain = {"relu": torch.relu(lin), "relu6": F.relu6(lin), "gelu": F.gelu(lin),
             "gelu_tanh": F.gelu(lin, approximate="tanh")}[act]
    err, err_plain = (y.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert err <= 2 * err_plain + 1e-6 * (ref.abs().max().item() + 1), (err, err_plain)


@pytest.mark.parametrize("act", ACTS)
def test_activation_epilogue_per_element(isa, act):
    # Per element: the epilogue's activation of the fp32 pre-activation is within a few fp32 units of the fp64
    # activation of that same value (relu and relu6 exactly), over the whole range (GELU's negative tail included).
    q, s, p, b = _packed(64, 96)
    x = torch.randn(300, 96) * 8
    pre = ops.int8_linear(x, p, s, b)
    y = ops.int8_linear(x, p, s, b, act)
    if act in ("relu", "relu6"):
        assert torch.equal(y, torch.relu(pre) if act == "relu" else F.relu6(pre))
        return
    want = _act64(act, pre)
    eps = torch.finfo(torch.float32).eps
    # A-S 7.1.26's erfc (|error| <= 1.5e-7, PyTorch's CPU erf too) bounds GELU's tail absolutely: |v| * 1e-7.
    bound = 8 * eps * want.abs() + 1e-7 * pre.double().abs() + 1e-30
    assert ((y.double() - want).abs() <= bound).all()


def test_activation_epilogue_path_and_thread_independent():
    q, s, p, b = _packed(100, 300)
    x = torch.randn(200, 300)
    for act in ACTS:
        for out_dtype in (torch.float32, torch.bfloat16):
            outs = []
            for name in available_cpu_isas():
                with fastdistill.cpu_isa(name):
                    outs.append(ops.int8_linear(x, p, s, b, act, out_dtype))
            threads = torch.get_num_threads()
            try:
                torch.set_num_threads(1)
                outs.append(ops.int8_linear(x, p, s, b, act, out_dtype))
            finally:
                torch.set_num_threads(threads)
            assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_out_dtype_is_the_rounded_fp32_output():
    q, s, p, b = _packed(40, 70)
    for x in (torch.randn(2, 3, 70), torch.randn(2, 3, 70).bfloat16()):
        y32 = ops.int8_linear(x, p, s, b, "gelu", torch.float32)
        for dt in (torch.bfloat16, torch.float16):
            assert torch.equal(ops.int8_linear(x, p, s, b, "gelu", dt), y32.to(dt))
        assert ops.int8_linear(x, p, s, b, "gelu").dtype == x.dtype


def test_activation_errors():
    q, s, p, b = _packed(8, 16)
    # The op's list (glue/int8.h) is the Python one, in the same order.
    names = ", ".join(f"'{a}'" for a in ops.INT8_ACTIVATIONS[:-1]) + f" or '{ops.INT8_ACTIVATIONS[-1]}'"
    with pytest.raises(RuntimeError, match=rf"^fastdistill\.int8_linear: activation must be {names}, got 'silu'$"):
        torch.ops.fastdistill.int8_linear(torch.randn(2, 16), p, s, b, "silu")
    for act in ops.INT8_ACTIVATIONS:
        torch.ops.fastdistill.int8_linear(torch.randn(2, 16), p, s, b, act)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_linear: out_dtype must be float32, bfloat16 or float16"):
        ops.int8_linear(torch.randn(2, 16), p, s, b, "none", torch.float64)
    with pytest.raises(ValueError, match="activation must be one of"):
        Int8Linear(16, 8, mode="weight_only", activation="gelu")


def test_opcheck_activation_and_out_dtype():
    q, s, p, b = _packed(20, 36)
    x = torch.randn(3, 36)
    for args in [(x, p, s, b, "gelu", None), (x, p, s, None, "gelu_tanh", torch.bfloat16),
                 (x.bfloat16(), p, s, b, "relu", torch.float32),
                 (x, p, s, b, "relu6", None), (x, p, s, b, "none", torch.float16)]:
        torch.library.opcheck(torch.ops.fastdistill.int8_linear, args)


# ---------------------------------------------------------------- fused Q/K/V
def _layers(k, sizes, sparse=False):
    out = []
    for n in sizes:
        lin = nn.Linear(k, n)
        out.append(SparseInt8Linear.from_dense(lin) if sparse else Int8Linear.from_float(lin))
    return out


@pytest.mark.parametrize("k,sizes", [(1, (1, 2, 3)), (33, (40, 24, 17)), (384, (384, 384, 384)), (100, (7, 7, 7))])
@pytest.mark.parametrize("m", [1, 14, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_equals_three_int8_linears(isa, k, sizes, m, dtype):
    layers = _layers(k, sizes)
    fused = FusedQKV.from_layers(layers)
    x = (torch.randn(2, m, k) * 2).to(dtype)
    for got, layer in zip(fused(x), layers):
        assert torch.equal(got, layer(x))


@pytest.mark.parametrize("m", [1, 14, 130])
def test_fused_qkv_equals_three_sparse_int8_linears(isa, m):
    layers = _layers(64, (64, 32, 48), sparse=True)
    fused = FusedQKV.from_layers(layers)
    x = torch.randn(m, 64)
    for got, layer in zip(fused(x), layers):
        assert torch.equal(got, layer(x))


# ---------------------------------------------------------------- a tiny BERT
def _bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=144,
               max_position_embeddings=64)
    cfg.update(kw)
    return BertModel(BertConfig(**cfg)).eval()


def _inputs(b, seq, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (b, seq), generator=g)
    mask = torch.ones(b, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # padding in the first row
    return ids, mask


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("hidden_act", ["relu", "relu6"])
def test_bert_relu_ffn_fused_is_exact(hidden_act):
    """ReLU and ReLU6 in the epilogue round as torch's do on the same fp32 value: the fused model is bit for bit."""
    base = _bert(hidden_act=hidden_act)
    unfused = quantize_(copy.deepcopy(base))
    fused = quantize_(copy.deepcopy(base), fuse=True)
    assert [mod.activation for mod in fused.modules() if isinstance(mod, Int8Linear) and mod.activation != "none"] \
        == [hidden_act, hidden_act]
    ids, mask = _inputs(2, 9)
    assert torch.equal(_hidden(fused, ids, mask), _hidden(unfused, ids, mask))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_fused_equals_unfused(attn):
    base = _bert(attn_implementation=attn)
    unfused = quantize_(copy.deepcopy(base))
    qkv_only = quantize_(copy.deepcopy(base))
    assert fuse_int8_(qkv_only, ffn_activation=False) == {"qkv": 2, "ffn_activation": 0}
    fused = quantize_(copy.deepcopy(base), fuse=True)
    assert sum(isinstance(mod, FusedQKV) for mod in fused.modules()) == 2
    assert [mod.activation for mod in fused.modules() if isinstance(mod, Int8Linear) and mod.activation != "none"] \
        == ["gelu", "gelu"]
    for seq in (1, 7, 14):
        ids, mask = _inputs(2, seq)
        ref = _hidden(unfused, ids, mask)
        assert torch.equal(_hidden(qkv_only, ids, mask), ref)  # Q/K/V fused: bit for bit
        # GELU in the epilogue: fastdistill's fp32 GELU instead of PyTorch's (a few fp32 units apart), and a unit in
        # the last place can flip an int8 rounding of the next layer's quantized input; so not bit for bit, but
        # within int8 steps, and as faithful to the fp32 model.
        out, fp32 = _hidden(fused, ids, mask), _hidden(base, ids, mask)
        torch.testing.assert_close(out, ref, rtol=0, atol=0.05 * ref.abs().max().item())
        cos = lambda a, b: F.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1)).mean().item()  # noqa: E731
        assert cos(out, fp32) >= cos(ref, fp32) - 1e-4


def test_sparse_bert_fused_qkv_equals_unfused():
    base = _bert()
    sparsify_(base)
    unfused = quantize_(copy.deepcopy(base))
    fused = quantize_(copy.deepcopy(base), fuse=True)
    assert sum(isinstance(mod, FusedQKV) and isinstance(mod.proj, SparseInt8Linear) for mod in fused.modules()) == 2
    ids, mask = _inputs(2, 9)
    assert torch.equal(_hidden(fused, ids, mask), _hidden(unfused, ids, mask))  # 2:4 has no GELU epilogue: exact


def test_bert_compile_fullgraph_dynamic_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = quantize_(_bert(), fuse=True)
    counter = CompileCounterWithBackend("inductor")  # counts the frames dynamo compiles
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for seq in (7, 13, 30):
        ids, mask = _inputs(2, seq)
        with torch.no_grad():
            out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out, _hidden(model, ids, mask), rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1:] == [frames[0]] * 2  # later sequence lengths reuse the dynamic graph


def test_unrecognised_structures_keep_the_unfused_path():
    from transformers.models.bert.modeling_bert import BertSelfAttention

    class ReorderedSelfAttention(BertSelfAttention):  # same signature, different computation: the probe catches it
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            out, w = super().forward(hidden_states.flip(1), attention_mask, **kwargs)
            return out * 2, w

    model = _bert()
    layer = model.encoder.layer[0].attention
    layer.self.__class__ = ReorderedSelfAttention
    model.encoder.layer[1].intermediate.intermediate_act_fn = nn.SiLU()  # no epilogue form
    unfused = quantize_(copy.deepcopy(model))
    fused = quantize_(model, fuse=True)
    assert type(fused.encoder.layer[0].attention.self) is ReorderedSelfAttention
    assert isinstance(fused.encoder.layer[0].attention.self.query, Int8Linear)
    assert isinstance(fused.encoder.layer[1].attention.self.qkv, FusedQKV)
    assert isinstance(fused.encoder.layer[1].intermediate.intermediate_act_fn, nn.SiLU)
    assert fused.encoder.layer[0].intermediate.dense.activation == "gelu"
    ids, mask = _inputs(2, 6)
    torch.testing.assert_close(_hidden(fused, ids, mask), _hidden(unfused, ids, mask), rtol=1e-4, atol=1e-4)

    class Toy(nn.Module):  # not a transformers module: untouched
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    toy = quantize_(Toy(), fuse=True)
    assert all(type(getattr(toy, n)) is Int8Linear for n in ("query", "key", "value"))


def test_a_rewrite_that_changes_the_output_is_undone(monkeypatch):
    # The probe compares every rewritten module with the original: a fused call that swapped K and V stays unfused.
    monkeypatch.setattr(FusedQKV, "forward", lambda self, x: (lambda q, k, v: (q, v, k))(*self.proj(x).split(self.sizes, -1)))
    model = _bert()
    unfused = quantize_(copy.deepcopy(model))
    fused = quantize_(model, fuse=True)
    assert not any(isinstance(mod, FusedQKV) for mod in fused.modules())
    ids, mask = _inputs(2, 6)
    torch.testing.assert_close(_hidden(fused, ids, mask), _hidden(unfused, ids, mask), rtol=1e-4, atol=1e-4)


def test_fused_model_refuses_save_compressed(tmp_path):
    model = quantize_(_bert(), fuse=True)
    with pytest.raises(ValueError, match="fused Q/K/V"):
        fastdistill.save_compressed(model, tmp_path / "out")
    ffn_only = quantize_(_bert())
    assert fuse_int8_(ffn_only, qkv=False) == {"qkv": 0, "ffn_activation": 2}
    with pytest.raises(ValueError, match="fused activation 'gelu'"):
        fastdistill.save_compressed(ffn_only, tmp_path / "ffn")

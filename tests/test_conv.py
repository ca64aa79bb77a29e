"""int8 Conv2d: kernels (implicit GEMM, 1x1, depthwise; every CPU ISA path) against the exact fp64 result of the
same quantized math and against fp32 convs within the quantization error, BatchNorm folding, quantize_ on CNNs,
calibration, opcheck / compile, state_dict, and bad inputs."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdistill
from fastdistill import Int8Conv2d, calibrate, fold_batchnorm_, ops, quantize_, quantize_per_channel
from fastdistill.convert import CannotConvert, conv_chains
from fastdistill.isa import available_cpu_isas
from fastdistill.reference import int8_conv2d_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (n, cin, cout, h, w, kernel, stride, padding, dilation, groups)
CASES = [
    (1, 3, 16, 17, 19, 7, 2, 3, 1, 1),            # RGB stem: Cin padded to 4 per tap
    (2, 16, 24, 9, 9, 1, 1, 0, 1, 1),             # 1x1: the input is A itself
    (2, 17, 33, 10, 7, 1, 2, 0, 1, 1),            # 1x1 strided, odd channels
    (1, 5, 7, 8, 8, 3, 1, 1, 1, 1),
    (3, 20, 70, 11, 13, 3, 2, 1, 1, 1),
    (1, 8, 9, 12, 12, (3, 5), (1, 2), (2, 1), (2, 1), 1),  # rectangular everything
    (2, 64, 130, 15, 15, 3, 1, 1, 1, 1),          # several 96-pixel tiles and 64-column panels
    (1, 256, 40, 6, 6, 3, 1, 1, 1, 1),            # K = 2304: several K slices
    (1, 3, 5, 3, 3, 3, 1, 0, 1, 1),               # one output pixel
    (1, 32, 32, 14, 14, 3, 1, 1, 1, 32),          # depthwise 3x3
    (2, 19, 19, 9, 8, 3, 2, 1, 1, 19),            # depthwise strided, odd channels
    (1, 144, 144, 7, 7, 5, 1, 2, 1, 144),         # depthwise 5x5, several 64-channel chunks
    (1, 70, 70, 9, 9, 3, 1, 2, 2, 70),            # depthwise dilated
]


def _case_id(case):
    n, cin, cout, h, w, k, s, p, d, g = case
    return f"n{n}-c{cin}-{cout}-{h}x{w}-k{k}-s{s}-p{p}-d{d}-g{g}"


def _conv_inputs(case, dtype=torch.float32, bias=True, seed=0):
    n, cin, cout, h, w, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=gen))
    x = (torch.randn(n, cin, h, w, generator=gen) * 2).to(dtype).contiguous(memory_format=torch.channels_last)
    return conv, x


def _quantized(conv):
    q, s = quantize_per_channel(conv.weight.detach().reshape(conv.out_channels, -1))
    q = q.reshape(conv.weight.shape)
    return q, s, ops.int8_conv2d_pack_weight(q, conv.groups)


def _run(conv, x, packed, s, bias, x_scale=None, residual=None, activation="none"):
    return ops.int8_conv2d(x, packed, s, bias, x_scale, residual, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, activation)


def _reference(conv, x, q, s, bias, x_scale=None, residual=None, activation="none"):
    return int8_conv2d_reference(x, q, s, bias, x_scale, residual, conv.stride, conv.padding, conv.dilation,
                                 conv.groups, activation)


def assert_epilogue_rounding_only(y, ref, bias, residual=None, out_dtype=torch.float32):
    """The int32 sums are exact, so only the fp32 epilogue (int32 -> fp32, the scale product, the fma with the
    bias, the residual add: a few roundings of each term) and the output dtype may differ from the fp64 result."""
    eps = torch.finfo(torch.float32).eps
    b = bias.double().abs().reshape(1, -1, 1, 1) if bias is not None else 0.0
    r = residual.double().abs() if residual is not None else 0.0
    unbiased = (ref - (bias.double().reshape(1, -1, 1, 1) if bias is not None else 0.0)).abs()
    bound = 4 * eps * (unbiased + b + r) + torch.finfo(out_dtype).eps * ref.abs() + 1e-30
    excess = (y.double() - ref).abs() - bound
    assert (excess <= 0).all(), (excess.max().item(), (y.double() - ref).abs().max().item())


# ---------------------------------------------------------------- kernels vs the exact quantized math
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_conv_vs_fp64_reference(isa, case, static):
    conv, x = _conv_inputs(case)
    q, s, packed = _quantized(conv)
    # static: a calibrated scale of 80% of this input's range, so the largest values saturate
    x_scale = (x.abs().amax() * 0.8 / 127).reshape(1) if static else None
    y = _run(conv, x, packed, s, conv.bias, x_scale)
    ref = _reference(conv, x, q, s, conv.bias, x_scale)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_epilogue_rounding_only(y, ref, conv.bias)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[9], CASES[10]], ids=_case_id)
@pytest.mark.parametrize("activation", ops.CONV_ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_epilogue(isa, case, activation, with_residual, bias):
    conv, x = _conv_inputs(case, bias=bias)
    q, s, packed = _quantized(conv)
    y0 = _run(conv, x, packed, s, conv.bias)
    residual = torch.randn(y0.shape) * 3 if with_residual else None
    y = _run(conv, x, packed, s, conv.bias, None, residual, activation)
    ref = _reference(conv, x, q, s, conv.bias, None, residual, activation)
    assert_epilogue_rounding_only(y, ref, conv.bias, residual)
    if activation == "relu6":
        assert y.min() >= 0 and y.max() <= 6 and (y == 6).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[10]], ids=_case_id)
def test_conv_dtypes(isa, dtype, case):
    conv, x = _conv_inputs(case, dtype=dtype)
    q, s, packed = _quantized(conv)
    y0 = _run(conv, x, packed, s, conv.bias.to(dtype))
    residual = torch.randn(y0.shape).to(dtype)
    y = _run(conv, x, packed, s, conv.bias.to(dtype), None, residual, "relu")
    assert y.dtype == dtype
    ref = _reference(conv, x, q, s, conv.bias.to(dtype), None, residual, "relu")
    assert_epilogue_rounding_only(y, ref, conv.bias.to(dtype), residual, out_dtype=dtype)


# ---------------------------------------------------------------- against fp32 convs: the quantization error
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv_vs_fp32_within_quantization_error(case):
    conv, x = _conv_inputs(case)
    q, s, packed = _quantized(conv)
    y = _run(conv, x, packed, s, conv.bias)
    with torch.no_grad():
        exact = conv.double()(x.double())
    # |x - s_x q_x| <= s_x / 2 and |w - s_w q_w| <= s_w / 2 per element, so per output element
    # |y - conv(x, w)| <= sum over taps of (s_x / 2 |w| + |x| s_w / 2 + s_x s_w / 4), plus fp32 roundings.
    sx = (x.abs().amax() / 127).double()
    sw = s.double().reshape(1, -1, 1, 1)
    ones = torch.ones_like(x, dtype=torch.float64)
    w_abs = conv.weight.detach().double().abs()
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    taps = F.conv2d(ones, torch.ones_like(w_abs), **geometry)
    bound = (sx / 2 * F.conv2d(ones, w_abs, **geometry) + sw / 2 * F.conv2d(x.double().abs(), torch.ones_like(w_abs),
                                                                          **geometry)
             + sx * sw / 4 * taps)
    err = (y.double() - exact).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-4 * (exact.abs() + 1)).all(), (err - bound).max().item()
    rel = ((y.double() - exact).norm() / exact.norm()).item()
    assert rel < 0.03, rel


# ---------------------------------------------------------------- layouts, paths, threads
def test_nchw_input_is_converted_once_and_gives_the_same_result():
    conv, x = _conv_inputs(CASES[4])
    _, s, packed = _quantized(conv)
    y_cl = _run(conv, x, packed, s, conv.bias)
    y_nchw = _run(conv, x.contiguous(), packed, s, conv.bias)
    assert x.contiguous().is_contiguous() and not x.contiguous().is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y_cl, y_nchw) and y_nchw.is_contiguous(memory_format=torch.channels_last)
    residual = torch.randn(y_cl.shape)  # an NCHW residual too
    assert torch.equal(_run(conv, x, packed, s, conv.bias, None, residual),
                       _run(conv, x, packed, s, conv.bias, None, residual.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[11]], ids=_case_id)
def test_conv_path_and_thread_independent(case):
    conv, x = _conv_inputs(case)
    _, s, packed = _quantized(conv)
    outs = []
    for name in available_cpu_isas():
        with fastdistill.cpu_isa(name):
            outs.append(_run(conv, x, packed, s, conv.bias, None, None, "relu"))
            assert fastdistill._ext._C.dispatched_levels()["conv"] == {"amx": "avx512", "avx512bf16": "avx512"}.get(
                name, name)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        outs.append(_run(conv, x, packed, s, conv.bias, None, None, "relu"))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_saturation_far_outside_the_calibrated_range_is_never_nan(isa):
    for case in (CASES[3], CASES[9]):
        conv, x = _conv_inputs(case)
        q, s, packed = _quantized(conv)
        x_scale = torch.tensor([0.01])  # calibrated absmax 1.27
        far = x * 1e30
        far[0, 0, 0, 0] = float("inf")
        far[0, -1, -1, -1] = float("-inf")
        y = _run(conv, far, packed, s, conv.bias, x_scale)
        assert torch.isfinite(y).all()
        ref = _reference(conv, far, q, s, conv.bias, x_scale)  # every input at +-127: the saturated value
        assert_epilogue_rounding_only(y, ref, conv.bias)


def test_zero_input_and_empty_batch(isa):
    conv, x = _conv_inputs(CASES[3])
    _, s, packed = _quantized(conv)
    y = _run(conv, torch.zeros_like(x), packed, s, conv.bias)
    assert torch.equal(y, conv.bias.detach().reshape(1, -1, 1, 1).expand_as(y))
    assert _run(conv, x[:0], packed, s, conv.bias).shape == (0, 7, 8, 8)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_unpack_weight_is_the_inverse_of_pack(case):
    conv, _ = _conv_inputs(case)
    q, _, packed = _quantized(conv)
    q[0].fill_(-127)  # the extremes and a sign change survive the int16 / VNNI layouts
    q[-1].fill_(127)
    packed = ops.int8_conv2d_pack_weight(q, conv.groups)
    w = ops.int8_conv2d_unpack_weight(packed, q.shape)
    assert w.dtype == torch.int8 and w.is_contiguous() and torch.equal(w, q)


# ---------------------------------------------------------------- opcheck / compile
def test_opcheck():
    for case in (CASES[0], CASES[1], CASES[10]):
        conv, x = _conv_inputs(case)
        q, s, packed = _quantized(conv)
        y = _run(conv, x, packed, s, conv.bias)
        geometry = (list(conv.kernel_size), list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        torch.library.opcheck(torch.ops.fastdistill.int8_conv2d_pack_weight, (q, conv.groups))
        torch.library.opcheck(torch.ops.fastdistill.int8_conv2d_unpack_weight, (packed, list(q.shape)))
        for args in [(x, packed, s, conv.bias, None, None, *geometry, "none"),
                     (x, packed, s, None, torch.tensor([0.02]), torch.randn(y.shape), *geometry, "relu6"),
                     (x.contiguous().bfloat16(), packed, s, conv.bias, None, None, *geometry, "relu")]:
            torch.library.opcheck(torch.ops.fastdistill.int8_conv2d, args)


class _SmallCNN(nn.Module):
    """A stem, an inverted residual block (1x1 expand, depthwise 3x3, 1x1 project, residual add) and a head:
    MobileNetV2's structure in miniature, with BatchNorm everywhere."""

    def __init__(self, c=8, e=24, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(inplace=True))
        self.block = nn.Sequential(
            nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(inplace=True),
            nn.Conv2d(e, e, 3, 1, 1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(inplace=True),
            nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


def _randomize_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)


def _small_cnn(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = _SmallCNN()
    _randomize_bn(model, gen)
    return model.eval()


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = _small_cnn()
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    quantize_(model, calibration=calibrate(model, [x]))
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- BatchNorm folding
class _Basic(nn.Module):
    """ResNet's BasicBlock: one ReLU module called twice, the BNs read attributes' outputs, a downsample branch."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout, affine=False)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


def test_fold_batchnorm_is_exact_in_fp64():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(_Basic(3, 8, 2), _Basic(8, 8, 1)).double()
    _randomize_bn(model, gen)
    model.eval()
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64, generator=gen)
    ref = model(x)
    assert fold_batchnorm_(model) is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model[0].conv1.bias is not None and model[0].conv1.bias.dtype == torch.float64
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_fold_batchnorm_skips_and_names_what_it_cannot_fold():
    model = _small_cnn()
    model.stem[1].train()
    model.block[1] = nn.BatchNorm2d(24, track_running_stats=False).eval()
    with pytest.warns(UserWarning, match=r"fastdistill\.fold_batchnorm_: left 2 BatchNorm2d layer\(s\) unfolded: "
                                         r"stem\.1 \(training mode.*block\.1 \(no running statistics"):
        fold_batchnorm_(model)
    assert isinstance(model.stem[1], nn.BatchNorm2d) and isinstance(model.block[4], nn.Identity)


def test_conv_chains_follow_the_data_flow():
    chains = conv_chains(_Basic(3, 8, 2))
    # bn1's output goes to the shared relu (called twice): no activation; bn2's to the add.
    assert chains == {"conv1": ("bn1", None), "conv2": ("bn2", None), "downsample.0": ("downsample.1", None)}
    chains = conv_chains(_SmallCNN())
    assert chains["stem.0"] == ("stem.1", "stem.2") and chains["block.3"] == ("block.4", "block.5")
    assert chains["block.6"] == ("block.7", None)


# ---------------------------------------------------------------- quantize_ on CNNs
def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def test_quantize_cnn_folds_fuses_and_calibrates():
    model = _small_cnn()
    dyn = copy.deepcopy(model)
    x = torch.randn(4, 3, 20, 20).contiguous(memory_format=torch.channels_last)
    ref = model(x)
    cal = calibrate(model, [x[:2], x[2:]])
    assert set(cal.input_absmax) == {"stem.0", "block.0", "block.3", "block.6"}
    torch.testing.assert_close(cal.input_absmax["stem.0"], x.abs().amax())
    quantize_(model, calibration=cal)
    convs = {fqn: m for fqn, m in model.named_modules() if isinstance(m, Int8Conv2d)}
    assert set(convs) == {"stem.0", "block.0", "block.3", "block.6"}
    assert [convs[f].activation for f in sorted(convs)] == ["relu6", "relu6", "none", "relu6"]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU6)) for m in model.modules())
    for fqn, m in convs.items():
        torch.testing.assert_close(m.input_scale, cal.input_absmax[fqn] / 127)
    y = model(x)
    assert _rel(y, ref) < 0.05, _rel(y, ref)
    # Dynamic when not calibrated: the same structure, close to fp32 too.
    quantize_(dyn)
    assert all(m.input_scale is None for m in dyn.modules() if isinstance(m, Int8Conv2d))
    assert _rel(dyn(x), ref) < 0.05


def test_quantize_training_model_keeps_its_batchnorm():
    model = _small_cnn().train()
    quantize_(model)
    assert isinstance(model.stem[0], Int8Conv2d) and isinstance(model.stem[1], nn.BatchNorm2d)
    assert model.stem[0].activation == "none"


def test_quantize_names_the_convs_it_skips():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Conv3d(2, 2, 1), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Conv2d(8, 16, 3, groups=8), nn.Conv2d(4, 4, 3, padding_mode="reflect", padding=1),
                          nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 4, padding="same")).eval()
    with pytest.warns(UserWarning) as record:
        quantize_(model)
    msg = [str(w.message) for w in record if "left" in str(w.message)]
    assert len(msg) == 1 and msg[0].startswith("fastdistill.quantize_: left 6 layer(s) unconverted: ")
    for part in ["0 (Conv1d has no int8 kernel", "1 (Conv3d has no int8 kernel",
                 "2 (groups=2 with 8 -> 8 channels is neither 1 nor depthwise",
                 "3 (groups=8 with 8 -> 16 channels is neither 1 nor depthwise", "4 (padding_mode='reflect'",
                 "6 (padding='same' with an even dilated kernel extent"]:
        assert part in msg[0], msg[0]
    assert isinstance(model[5], Int8Conv2d) and type(model[2]) is nn.Conv2d
    with pytest.warns(UserWarning, match=r"Conv2d has no weight_only int8 kernel"):
        quantize_(nn.Sequential(nn.Conv2d(4, 4, 1)), mode="weight_only")


def test_conv_k_bound_is_the_int8_gemms():
    # kh * kw * round_up(Cin, 4) of the implicit GEMM against the int8 GEMM's K bound, both from the extension: the
    # pack op refuses above it, from_float (and so quantize_) names it, and the largest fitting Cin converts.
    max_k = ops.int8_max_k()
    cin_ok = max_k // 9 // 4 * 4
    cin_big = cin_ok + 1
    assert ops.int8_conv_gemm_k(cin_big, 3, 3) == 9 * (cin_ok + 4) > max_k >= ops.int8_conv_gemm_k(cin_ok, 3, 3)
    with pytest.raises(RuntimeError, match=rf"int8_conv2d_pack_weight: kh \* kw \* round_up\(Cin, 4\) must be at most "
                                           rf"{max_k} \(int32 accumulation of int8 products\), got {9 * (cin_ok + 4)}"):
        ops.int8_conv2d_pack_weight(torch.zeros(2, cin_big, 3, 3, dtype=torch.int8), 1)
    with pytest.raises(CannotConvert, match=rf"= {9 * (cin_ok + 4)} is above {max_k} \(int32 accumulation\)"):
        Int8Conv2d.from_float(nn.Conv2d(cin_big, 2, 3))
    conv = nn.Conv2d(cin_ok, 2, 3)
    x = torch.randn(1, cin_ok, 3, 3)
    y = conv(x)
    torch.testing.assert_close(Int8Conv2d.from_float(conv)(x), y, rtol=0.05, atol=0.05 * y.abs().max().item())


def test_quantize_warns_about_convs_without_calibration():
    model = _small_cnn()
    x = torch.randn(1, 3, 8, 8)
    cal = calibrate(model, [x], filter_fn=lambda m, fqn: fqn != "block.3")
    with pytest.warns(UserWarning, match=r"no statistics for 1 conv layer\(s\), which quantize their input "
                                         r"dynamically: block\.3"):
        quantize_(model, calibration=cal)
    assert model.block[3].input_scale is None and model.block[0].input_scale is not None


def test_int8conv2d_module_padding_same_and_bare_conv():
    conv = nn.Conv2d(5, 6, 3, padding="same", dilation=2)
    x = torch.randn(2, 5, 9, 9)
    out = quantize_(conv)
    assert isinstance(out, Int8Conv2d) and out.padding == (2, 2)
    assert _rel(out(x), conv(x)) < 0.03


def test_state_dict_roundtrip_bit_identical():
    model = _small_cnn()
    x = torch.randn(2, 3, 16, 16)
    quantize_(model, calibration=calibrate(model, [x]))
    y = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["stem.0.weight"].dtype == torch.int8 and sd["stem.0.input_scale"].shape == ()
    assert "stem.0.w_packed" not in sd
    # one copy of the weights in the module: the packed layout (the state_dict's weight is unpacked from it)
    assert "weight" not in dict(model.stem[0].named_buffers())
    assert torch.equal(sd["stem.0.weight"], model.stem[0].int8_weight())
    fresh = _small_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(fresh)  # dynamic: the static scales come with the state_dict
    with pytest.raises(RuntimeError, match=r"Int8Conv2d: stem\.0\.weight must be int8 of shape \[8, 3, 3, 3\]"):
        fresh.load_state_dict({**sd, "stem.0.weight": sd["stem.0.weight"][:, :1]})
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    fresh.half()
    assert fresh.stem[0].weight_scale.dtype == torch.float32 and fresh.stem[0].input_scale.dtype == torch.float32


# ---------------------------------------------------------------- errors
def test_errors():
    conv, x = _conv_inputs(CASES[3])
    _, s, packed = _quantized(conv)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
    op = torch.ops.fastdistill.int8_conv2d
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_conv2d: x must be 4-D"):
        op(x[0], packed, s, None, None, None, *geometry, "none")
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_conv2d: x must have C=5 channels"):
        op(x[:, :4], packed, s, None, None, None, *geometry, "none")
    with pytest.raises(RuntimeError, match=r"w_packed holds a 3x3 kernel with groups=1, but kernel_size=\[1, 1\]"):
        op(x, packed, s, None, None, None, [1, 1], [1, 1], [0, 0], [1, 1], 1, "none")
    # The op's list (glue/int8.h) is ops.CONV_ACTIVATIONS, in the same order: int8_linear's GELUs are not in it.
    names = ", ".join(f"'{a}'" for a in ops.CONV_ACTIVATIONS[:-1]) + f" or '{ops.CONV_ACTIVATIONS[-1]}'"
    assert names == "'none', 'relu' or 'relu6'"
    with pytest.raises(RuntimeError, match=rf"activation must be {names}, got 'gelu'$"):
        op(x, packed, s, None, None, None, *geometry, "gelu")
    with pytest.raises(RuntimeError, match=r"x_scale must be a float32 tensor of 1 element"):
        op(x, packed, s, None, torch.ones(2), None, *geometry, "none")
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape"):
        op(x, packed, s, None, None, torch.randn(1, 7, 8, 7), *geometry, "none")
    with pytest.raises(RuntimeError, match=r"w_scales must have shape \[Cout\] = \[7\]"):
        op(x, packed, s[:6], None, None, None, *geometry, "none")
    with pytest.raises(RuntimeError, match=r"is smaller than the dilated kernel"):
        op(x[:, :, :1, :1], packed, s, None, None, None, [3, 3], [1, 1], [0, 0], [1, 1], 1, "none")
    with pytest.raises(RuntimeError, match=r"w_packed is not a CPU packed conv weight"):
        op(x, ops.int8_pack_weight(torch.zeros(7, 45, dtype=torch.int8)), s, None, None, None, *geometry, "none")
    with pytest.raises(RuntimeError, match=r"groups must be 1 or depthwise"):
        ops.int8_conv2d_pack_weight(torch.zeros(8, 2, 3, 3, dtype=torch.int8), 4)
    with pytest.raises(RuntimeError, match=r"^fastdistill\.int8_conv2d_unpack_weight: w_packed holds a \[7, 5, 3, 3\] "
                                           r"weight, but shape=\[7, 5, 3, 1\] was given"):
        ops.int8_conv2d_unpack_weight(packed, (7, 5, 3, 1))
    with pytest.raises(ValueError, match=r"groups must be 1 or depthwise"):
        Int8Conv2d(8, 8, 3, groups=2)
    with pytest.raises(NotImplementedError, match=r"int8 Conv2d has CPU kernels only so far; got a tensor on cuda"):
        ops._conv_cpu_only("int8_conv2d", torch.device("cuda"))


@pytest.mark.cuda
def test_cuda_tensors_are_a_clear_not_implemented_error():
    conv, x = _conv_inputs(CASES[3])
    _, s, packed = _quantized(conv)
    with pytest.raises(NotImplementedError, match=r"int8 Conv2d has CPU kernels only so far"):
        _run(conv, x.cuda(), packed, s, conv.bias)

"""Int8 CNNs as models: on torchvision's real architectures (random weights, BatchNorm statistics set) quantize_ with
calibrated static scales converts every conv and tracks fp32 at least as closely as torch.ao's fbgemm static int8 on
the same calibration batches; residual blocks fuse their add and activations into the conv epilogues
(fusion.fuse_conv_blocks_) exactly, and leave alone what the epilogue does not cover."""
import copy
import io

import pytest
import torch
from torch import nn

from fastdistill import Int8Conv2d, calibrate, quantize_
from fastdistill.bench import conv as bench_conv


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_int8_model_is_closer_to_fp32_than_fbgemm(name):
    model = bench_conv.build(name)
    size = bench_conv.QUICK_SIZE
    calibration = [bench_conv.images(4, seed, size) for seed in range(2)]
    ours = bench_conv.fastdistill_int8(model, calibration)
    fbgemm = bench_conv.fbgemm_int8(model, calibration)
    convs = [m for m in ours.modules() if isinstance(m, (torch.nn.Conv2d, Int8Conv2d))]
    assert convs and all(isinstance(m, Int8Conv2d) for m in convs)
    x = bench_conv.images(2, 100, size)
    with torch.inference_mode():
        ref = model(x)
        err_ours, err_fbgemm = bench_conv.rel_l2(ours(x), ref), bench_conv.rel_l2(fbgemm(x), ref)
    assert err_ours <= err_fbgemm and err_ours < 0.05, (err_ours, err_fbgemm)


class _Block(nn.Module):
    """A residual block in the BasicBlock style: one ReLU module called twice, BN after each conv, the residual
    through an optional projection, and the add written as `out += identity` or as `identity + out`."""

    def __init__(self, cin, cout, stride=1, iadd=True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else None
        self.iadd = iadd

    def forward(self, x):
        identity = x if self.proj is None else self.proj(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.iadd:
            out += identity
        else:
            out = identity + out
        return self.relu(out)


class _BroadcastAdd(nn.Module):
    """conv(x) + a per-channel tensor: an add the epilogue's residual does not cover."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, 6, 1, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) + self.shift)


def _seeded(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval().to(memory_format=torch.channels_last)


def _quantized_pair(model, x):
    """(quantize_ without the block fusion, quantize_ as shipped) on copies of model, calibrated on x."""
    import fastdistill.fusion as fusion

    original = fusion.fuse_conv_blocks_
    fusion.fuse_conv_blocks_ = lambda m: 0
    try:
        plain = quantize_(copy.deepcopy(model), calibration=calibrate(model, [x]))
    finally:
        fusion.fuse_conv_blocks_ = original
    fused = quantize_(copy.deepcopy(model), calibration=calibrate(model, [x]))
    return plain, fused


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_block_fusion_is_exact_on_torchvision_models(name):
    """In fp32 the epilogue's act(acc * s + bias + residual) rounds as conv, add and ReLU did one after another."""
    model = bench_conv.build(name)
    x = bench_conv.images(2, 7, bench_conv.QUICK_SIZE)
    plain, fused = _quantized_pair(model, x)
    assert sum(isinstance(m, torch.fx.GraphModule) for m in fused.modules()) == (8 if name == "resnet18" else 10)
    assert set(fused.state_dict()) == set(plain.state_dict())
    buffer = io.BytesIO()
    torch.save(fused, buffer)  # pickling a GraphModule re-traces its code
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        y = fused(x)
        assert torch.equal(y, plain(x)) and torch.equal(reloaded(x), y)


@pytest.mark.parametrize("iadd", [True, False], ids=["iadd", "add"])
@pytest.mark.parametrize("stride,cin", [(1, 8), (2, 5)], ids=["identity", "projection"])
def test_residual_block_fuses_the_add_and_both_relus(iadd, stride, cin):
    block = _seeded(nn.Sequential(_Block(cin, 8, stride, iadd)))
    x = torch.randn(2, cin, 9, 11).contiguous(memory_format=torch.channels_last)
    plain, fused = _quantized_pair(block, x)
    nodes = [n for n in fused[0].graph.nodes if n.op in ("call_function", "call_module")]
    with_residual = [n.target for n in nodes if "residual" in n.kwargs]
    # Either conv feeding the add may take it (the other's output is then the residual).
    assert len(with_residual) == 1 and with_residual[0] in ("conv2", "proj.0"), nodes
    assert "relu" not in [n.target for n in nodes], nodes
    assert fused[0].conv1.activation == "relu" and fused[0].get_submodule(with_residual[0]).activation == "relu"
    with torch.inference_mode():
        ref = block(x)
        y_plain, y_fused = plain(x), fused(x)
    assert torch.equal(y_fused, y_plain)
    assert bench_conv.rel_l2(y_fused, ref) < 0.05
    compiled = torch.compile(fused, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), y_fused, rtol=1e-5, atol=1e-5)


def test_broadcasting_add_keeps_its_meaning():
    model = _seeded(nn.Sequential(_BroadcastAdd()))
    x = torch.randn(2, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    plain, fused = _quantized_pair(model, x)
    assert isinstance(fused[0], torch.fx.GraphModule)
    with torch.inference_mode():
        assert torch.equal(fused(x), plain(x))


@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_int8_conv2d_residual_argument(activation):
    """forward(x, residual) is activation(conv(x) + residual): in the epilogue for an output-shaped residual, as
    separate ops for a broadcasting or type-promoting one."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    q = Int8Conv2d.from_float(conv, activation=activation)
    x = (torch.randn(2, 4, 5, 5) * 3).contiguous(memory_format=torch.channels_last)
    act = {"none": lambda v: v, "relu": torch.relu, "relu6": lambda v: v.clamp(0, 6)}[activation]
    q.activation = "none"
    base = q(x)
    q.activation = activation
    for residual in (torch.randn(2, 6, 5, 5) * 4, torch.randn(1, 6, 1, 1) * 4, torch.randn(6, 1, 1, dtype=torch.float64)):
        expected = act(base + residual)
        got = q(x, residual)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_a_conv_output_read_twice_is_not_fused():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y + x) * y

    model = _seeded(nn.Sequential(TwoReaders()))
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    plain, fused = _quantized_pair(model, x)
    assert not isinstance(fused[0], torch.fx.GraphModule)
    with torch.inference_mode():
        assert torch.equal(fused(x), plain(x))

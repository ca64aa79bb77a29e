"""Benchmark cases for int8 CNN inference (issue 20): torchvision's ResNet-18 and MobileNetV2 (architectures only,
random weights with BatchNorm statistics set, eval mode, channels_last, 224 x 224; 96 x 96 with --quick) quantized by fastdistill
(fold_batchnorm_ + quantize_ with calibrated static activation scales, ReLU/ReLU6 fused) against fp32 eager and
the int8 a user picks on CPU: torch.ao's FX static quantization with the fbgemm backend, and ONNX Runtime's static
QDQ quantization (per-channel int8 weights, uint8 activations, ORT_ENABLE_ALL), each calibrated on the same batches. The FLOPs are the model's multiply-adds x 2, so 'achieved' is its effective GOP/s. Each case's note
gives the relative L2 error of the logits against fp32 for both int8 models."""
import copy
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision  # the architectures; without it the runner skips this family and says why
from torch import nn

from fastdistill.bench.common import Case

FULL = [("resnet18", 1), ("resnet18", 16), ("mobilenet_v2", 1), ("mobilenet_v2", 16)]
QUICK = [("resnet18", 1), ("mobilenet_v2", 1)]
SIZE, QUICK_SIZE = 224, 96
CALIBRATION, QUICK_CALIBRATION = (4, 8), (1, 2)  # (batches, images per batch)


def build(name: str) -> nn.Module:
    """The torchvision architecture, seeded random weights, BatchNorm running statistics drawn so that folding is not
    the identity, eval mode, channels_last."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval().to(memory_format=torch.channels_last)


def images(batch: int, seed: int, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)


def fastdistill_int8(model: nn.Module, calibration_batches) -> nn.Module:
    from fastdistill import calibrate, quantize_

    q = copy.deepcopy(model)
    quantize_(q, calibration=calibrate(q, calibration_batches))
    return q


def fbgemm_int8(model: nn.Module, calibration_batches) -> nn.Module:
    """torch.ao FX static post-training quantization, fbgemm's default qconfig (per-channel weights)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("fbgemm"), calibration_batches[:1])
        with torch.no_grad():
            for x in calibration_batches:
                prepared(x)
        return convert_fx(prepared)


def onnxruntime_int8(model: nn.Module, calibration_batches, workdir: Path):
    """ONNX Runtime static int8 (QDQ, per-channel symmetric int8 weights, uint8 activations) of the fp32 model,
    calibrated on the same batches: a callable x -> logits (fp32 torch). The files in workdir are only read while
    the session is built."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, pre_path, int8_path = workdir / "model.onnx", workdir / "model_pre.onnx", workdir / "model_int8.onnx"
    batch = torch.export.Dim("batch")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).to(memory_format=torch.contiguous_format), (calibration_batches[0],),
                          str(fp32_path), input_names=["x"], output_names=["logits"], dynamo=True, verbose=False,
                          dynamic_shapes={"x": {0: batch}})

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": b.contiguous().numpy()} for b in calibration_batches])

        def get_next(self):
            return next(self.items, None)

    quant_pre_process(str(fp32_path), str(pre_path))  # ORT's recommended shape inference and graph optimisation
    quantize_static(str(pre_path), str(int8_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"x": x.contiguous().numpy()})[0])


def _not_installed():
    raise RuntimeError("not installed (pip install onnxruntime onnx onnxscript)")


def multiply_adds(model: nn.Module, x: torch.Tensor) -> int:
    """Conv and Linear multiply-adds of one forward, counted with hooks."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def _inference(model, x):
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def cases(quick: bool = False, device: str = "cpu"):
    out = []
    size, (n_batches, per_batch) = (QUICK_SIZE, QUICK_CALIBRATION) if quick else (SIZE, CALIBRATION)
    for name, batch in (QUICK if quick else FULL):
        model = build(name)
        calibration = [images(per_batch, seed, size) for seed in range(n_batches)]
        ours, fbgemm = fastdistill_int8(model, calibration), fbgemm_int8(model, calibration)
        try:
            with tempfile.TemporaryDirectory(prefix="fastdistill_conv_") as workdir:
                ort_int8 = onnxruntime_int8(model, calibration, Path(workdir))
        except ImportError:
            ort_int8 = None
        x = images(batch, 100, size)
        with torch.inference_mode():
            ref = model(x)
            err = {"fastdistill": rel_l2(ours(x), ref), "fbgemm": rel_l2(fbgemm(x), ref)}
            if ort_int8 is not None:
                err["onnxruntime"] = rel_l2(ort_int8(x), ref)
        out.append(Case(
            family="conv", op=f"{name} int8", shape=f"batch {batch}, {size}x{size}", dtype="int8",
            run=_inference(ours, x), baselines={"fp32 eager": _inference(model, x),
                                                "torch.ao fbgemm int8": _inference(fbgemm, x),
                                                "onnxruntime int8 (QDQ)": _inference(ort_int8, x) if ort_int8
                                                else _not_installed},
            flops=2 * multiply_adds(model, x), peak_kind="int8",
            note="logits rel L2 vs fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in err.items()),
            extra={f"rel_l2_{k}": v for k, v in err.items()}))
    return out

"""Int8 CNNs on torchvision's real architectures (random weights, BatchNorm statistics set): fastdistill's
quantize_ with calibrated static scales tracks fp32 at least as closely as torch.ao's fbgemm static int8 on the same
calibration batches, and every conv of the model runs as Int8Conv2d."""
import pytest
import torch

from fastdistill import Int8Conv2d
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

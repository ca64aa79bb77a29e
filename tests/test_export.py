"""int8 export/import in compressed-tensors' int-quantized W8A8 layout, checked against the compressed-tensors
package itself (its config parser, its W8A8 preset, its compressor)."""
import json

import pytest
import torch
import torch.nn as nn

import fastdistill
from fastdistill.export import load_int8, save_int8

ct = pytest.importorskip("compressed_tensors", reason="the round trip is checked against compressed-tensors")
from compressed_tensors.compressors import BaseCompressor                       # noqa: E402
from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,  # noqa: E402
                                             preset_name_to_scheme)


def float_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 12, bias=False), nn.Linear(12, 5))


def not_last(mod, fqn):
    return fqn != "3"


def int_quantized():
    return BaseCompressor.get_value_from_registry("int-quantized")


def test_config_is_compressed_tensors_w8a8(tmp_path):
    model = fastdistill.quantize_(float_model(), filter_fn=not_last)
    save_int8(model, tmp_path, config={"model_type": "toy"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "toy"
    parsed = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert parsed.format == "int-quantized" and parsed.ignore == ["3"]
    scheme = parsed.config_groups["group_0"]
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    assert scheme.weights == preset.weights and scheme.input_activations == preset.input_activations


def test_round_trip_and_compressed_tensors_decompresses_ours(tmp_path):
    dense = float_model()
    model = fastdistill.quantize_(float_model(), filter_fn=not_last)
    save_int8(model, tmp_path)
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "model.safetensors"))
    scheme = QuantizationScheme.model_validate(
        json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"])
    for fqn in ("0", "2"):
        w, s = stored[f"{fqn}.weight"], stored[f"{fqn}.weight_scale"]
        assert w.dtype == torch.int8 and list(w.shape) == list(dense.get_submodule(fqn).weight.shape)
        assert s.dtype == torch.float32 and list(s.shape) == [w.shape[0], 1]
        theirs = int_quantized().decompress({"weight": w, "weight_scale": s}, scheme)["weight"]
        torch.testing.assert_close(theirs.float(), w.float() * s, rtol=0, atol=0)
        err = (theirs.float() - dense.get_submodule(fqn).weight.detach()).abs()
        assert bool((err <= s / 2 * (1 + 1e-6)).all())   # within half a step of the float weight

    loaded = load_int8(float_model(), tmp_path)
    assert [type(m) for m in loaded] == [fastdistill.Int8Linear, nn.GELU, fastdistill.Int8Linear, nn.Linear]
    for fqn in ("0", "2"):
        assert torch.equal(loaded.get_submodule(fqn).int8_weight(), model.get_submodule(fqn).int8_weight())
        assert torch.equal(loaded.get_submodule(fqn).weight_scale, model.get_submodule(fqn).weight_scale)
    x = torch.randn(7, 40)
    assert torch.equal(loaded(x), model(x))


def test_loads_what_compressed_tensors_compresses(tmp_path):
    from safetensors.torch import save_file
    dense = float_model()
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    for fqn in ("0", "2"):
        w = state.pop(f"{fqn}.weight")
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        out = int_quantized().compress({"weight": w, "weight_scale": scale}, scheme)
        state[f"{fqn}.weight"], state[f"{fqn}.weight_scale"] = out["weight"], out["weight_scale"]
    save_file(state, str(tmp_path / "model.safetensors"))
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, format="int-quantized", ignore=["3"],
                              quantization_status="compressed")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qcfg.model_dump()}))
    loaded = load_int8(float_model(), tmp_path)
    ours = fastdistill.quantize_(float_model(), filter_fn=not_last)
    for fqn in ("0", "2"):
        assert torch.equal(loaded.get_submodule(fqn).int8_weight(), state[f"{fqn}.weight"])
        assert torch.equal(loaded.get_submodule(fqn).int8_weight(), ours.get_submodule(fqn).int8_weight())
    x = torch.randn(5, 40)
    torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-6)
    assert isinstance(loaded[3], nn.Linear) and torch.equal(loaded[3].weight, dense[3].weight)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"fastdistill.save_int8: layer '0' is weight-only int8"):
        save_int8(fastdistill.quantize_(float_model(), mode="weight_only"), tmp_path)
    with pytest.raises(ValueError, match=r"fastdistill.load_int8: .*config.json has no quantization_config"):
        load_int8(float_model(), tmp_path)
    save_int8(fastdistill.quantize_(float_model()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"fastdistill.load_int8: config group 'group_0' is not fastdistill's W8A8"):
        load_int8(float_model(), tmp_path)
    with pytest.raises(ValueError, match=r"fastdistill.load_int8: the checkpoint does not fit the model"):
        save_int8(fastdistill.quantize_(float_model()), tmp_path)
        load_int8(nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 12, bias=False)), tmp_path)


# ----------------------------------------------------------------------------------------- 2:4 bitmask converter
@pytest.mark.parametrize("k", [4, 12, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse24_bitmask_matches_compressed_tensors(k, dtype):
    from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
    from fastdistill.export import from_sparse24_bitmask, to_sparse24_bitmask
    w = torch.randn(9, k).to(dtype)
    w[0, :4] = 0   # a group with no nonzeros still names (and stores) 2 columns
    mask = fastdistill.prune_2_4(w)
    values, meta = fastdistill.compress_2_4(w, mask)
    compressed, bitmask, shape = to_sparse24_bitmask(values, meta)
    assert shape.tolist() == [[9], [k]] and compressed.dtype == dtype
    assert torch.equal(bitmask, pack_bitmasks(mask))                    # their packing of our mask
    kept = unpack_bitmasks(bitmask, [9, k])
    dense = torch.zeros(9, k, dtype=dtype)
    dense[kept] = compressed.flatten()                                 # their decompression rule
    assert torch.equal(dense, fastdistill.decompress_2_4(values, meta))
    back_values, back_meta = from_sparse24_bitmask(compressed, bitmask, shape)
    assert torch.equal(back_values, values) and torch.equal(back_meta, meta)


def test_sparse24_bitmask_errors():
    from fastdistill.export import from_sparse24_bitmask
    with pytest.raises(ValueError, match=r"fastdistill.from_sparse24_bitmask: row 0, columns 0..3 keep 3 of 4"):
        from_sparse24_bitmask(torch.zeros(1, 4), torch.tensor([[0b00110111]], dtype=torch.uint8), [1, 8])
    with pytest.raises(ValueError, match=r"expected compressed \[1, 4\] and uint8 bitmask \[1, 1\]"):
        from_sparse24_bitmask(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.uint8), [1, 8])

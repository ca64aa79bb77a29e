"""Export/import in compressed-tensors' layouts (int-quantized W8A8, sparse-24-bitmask, and both composed), checked
against the compressed-tensors package itself (its config parsers, its W8A8 preset, its compressors)."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import fastdistill
from fastdistill.export import load_compressed, save_compressed

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
    save_compressed(model, tmp_path, config={"model_type": "toy"})
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
    save_compressed(model, tmp_path)
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

    loaded = load_compressed(float_model(), tmp_path)
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
    loaded = load_compressed(float_model(), tmp_path)
    ours = fastdistill.quantize_(float_model(), filter_fn=not_last)
    for fqn in ("0", "2"):
        assert torch.equal(loaded.get_submodule(fqn).int8_weight(), state[f"{fqn}.weight"])
        assert torch.equal(loaded.get_submodule(fqn).int8_weight(), ours.get_submodule(fqn).int8_weight())
    x = torch.randn(5, 40)
    torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-6)
    assert isinstance(loaded[3], nn.Linear) and torch.equal(loaded[3].weight, dense[3].weight)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"fastdistill.save_compressed: layer '0' is weight-only int8"):
        save_compressed(fastdistill.quantize_(float_model(), mode="weight_only"), tmp_path)
    with pytest.raises(ValueError, match=r"fastdistill.load_compressed: .*config.json has no quantization_config"):
        load_compressed(float_model(), tmp_path)
    save_compressed(fastdistill.quantize_(float_model()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"fastdistill.load_compressed: config group 'group_0' is not fastdistill's W8A8"):
        load_compressed(float_model(), tmp_path)
    with pytest.raises(ValueError, match=r"fastdistill.load_compressed: the checkpoint does not fit the model"):
        save_compressed(fastdistill.quantize_(float_model()), tmp_path)
        load_compressed(nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 12, bias=False)), tmp_path)


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


# ----------------------------------------------------------------------------------------- 2:4, and 2:4 + int8
def sparse_model(dtype=torch.float32):
    """2:4 on layers 0 and 2 (layer 3 stays dense), by magnitude; K of every layer a multiple of 4."""
    model = float_model().to(dtype)
    fastdistill.sparsify_(model, filter_fn=not_last)
    return model


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def their_dense_weight(stored, fqn, config):
    """One layer decompressed by compressed-tensors' rules: its sparse-24-bitmask config parsed by its config class,
    its bitmask unpacked by its unpack_bitmasks and the kept values scattered in row-major order (the legacy
    sparse-24-bitmask decompression; compressed-tensors 0.15+ dropped the compressor but keeps the config and the
    bitmask utilities), then, for a quantized layer, its int-quantized decompressor with the parsed scheme."""
    from compressed_tensors.config import Sparse24BitMaskConfig
    from compressed_tensors.utils import unpack_bitmasks
    qcfg = dict(config["quantization_config"])
    scfg = Sparse24BitMaskConfig.model_validate(qcfg.pop("sparsity_config"))
    assert scfg.sparsity_structure == "2:4" and scfg.format == "sparse-24-bitmask"
    shape = stored[f"{fqn}.shape"].flatten().tolist()
    kept = unpack_bitmasks(stored[f"{fqn}.bitmask"], shape)
    compressed = stored[f"{fqn}.compressed"]
    weight = torch.zeros(shape, dtype=compressed.dtype)
    weight[kept] = compressed.flatten()
    if "config_groups" in qcfg:
        scheme = QuantizationConfig.model_validate(qcfg).config_groups["group_0"]
        weight = int_quantized().decompress({"weight": weight, "weight_scale": stored[f"{fqn}.weight_scale"]},
                                            scheme)["weight"]
    return weight


@pytest.mark.parametrize("int8", [False, True], ids=["2:4", "2:4+int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_round_trip_exact_and_compressed_tensors_reads_it(tmp_path, int8, dtype):
    from safetensors.torch import load_file
    model = sparse_model(dtype)
    if int8:
        fastdistill.quantize_(model, filter_fn=lambda m, fqn: fqn != "3")   # SparseLinear -> SparseInt8Linear
    save_compressed(model, tmp_path, config={"model_type": "toy"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    scfg = qcfg["sparsity_config"]
    assert scfg["format"] == "sparse-24-bitmask" and scfg["sparsity_structure"] == "2:4" and scfg["ignore"] == ["3"]
    # global sparsity: half of the 2:4 layers' weights, of every number of the dense model
    dense_numel = sum(p.numel() for p in float_model().parameters())
    assert scfg["global_sparsity"] == pytest.approx((24 * 40 + 12 * 24) / 2 / dense_numel, abs=1e-6)
    if int8:
        parsed = QuantizationConfig.model_validate({k: v for k, v in qcfg.items() if k != "sparsity_config"})
        assert parsed.format == "int-quantized" and parsed.ignore == ["3"]
    else:
        assert set(qcfg) == {"quant_method", "sparsity_config"}
    stored = load_file(str(tmp_path / "model.safetensors"))
    for fqn in ("0", "2"):
        layer = model.get_submodule(fqn)
        assert f"{fqn}.weight" not in stored and stored[f"{fqn}.compressed"].dtype == (torch.int8 if int8 else dtype)
        theirs = their_dense_weight(stored, fqn, cfg)
        ours = layer.to_dense()
        assert torch.equal(theirs.to(ours.dtype), ours), fqn
    assert torch.equal(stored["3.weight"], model[3].weight.detach())

    loaded = load_compressed(float_model().to(dtype), tmp_path)
    kind = fastdistill.sparse.SparseInt8Linear if int8 else fastdistill.SparseLinear
    assert [type(m) for m in loaded] == [kind, nn.GELU, kind, nn.Linear]
    assert_same_state(loaded, model)
    x = torch.randn(6, 40, dtype=dtype)
    assert torch.equal(loaded(x), model(x))


def test_mixed_layers_round_trip(tmp_path):
    """One model holding a dense int8 layer, a 2:4 + int8 layer and a float 2:4 layer."""
    model = float_model()
    fastdistill.sparsify_(model, filter_fn=lambda m, fqn: fqn in ("0", "3"))
    fastdistill.quantize_(model, filter_fn=lambda m, fqn: fqn in ("0", "2"))
    assert [type(m).__name__ for m in model] == ["SparseInt8Linear", "GELU", "Int8Linear", "SparseLinear"]
    save_compressed(model, tmp_path)
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["ignore"] == ["3"] and qcfg["sparsity_config"]["ignore"] == ["2"]
    loaded = load_compressed(float_model(), tmp_path)
    assert [type(m).__name__ for m in loaded] == ["SparseInt8Linear", "GELU", "Int8Linear", "SparseLinear"]
    assert_same_state(loaded, model)
    x = torch.randn(3, 40)
    assert torch.equal(loaded(x), model(x))


def test_loads_a_checkpoint_composed_from_compressed_tensors_parts(tmp_path):
    """A 2:4 W8A8 checkpoint built from compressed-tensors' own pieces (its int-quantized compressor on the dense
    weight, then the legacy sparse-24-bitmask composition on the int8 weight: its pack_bitmasks of the nonzero
    pattern, the kept values row by row; its config classes for the config) loads into SparseInt8Linear layers
    holding exactly those values and scales."""
    from compressed_tensors.config import Sparse24BitMaskConfig
    from compressed_tensors.utils import pack_bitmasks
    from safetensors.torch import save_file
    dense = float_model()
    fastdistill.prune_2_4_(dense, method="magnitude", filter_fn=not_last)
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, format="int-quantized", ignore=["3"],
                              quantization_status="compressed")
    scfg = Sparse24BitMaskConfig(targets=["Linear"], ignore=["3"], sparsity_structure="2:4")
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    expected = {}
    for fqn in ("0", "2"):
        w = state.pop(f"{fqn}.weight")
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        q = int_quantized().compress({"weight": w, "weight_scale": scale}, scheme)
        kept = fastdistill.prune_2_4(w)   # the 2 nonzeros of each group (magnitude-pruned above)
        assert bool((q["weight"][~kept] == 0).all())
        state[f"{fqn}.compressed"] = q["weight"][kept].reshape(w.shape[0], -1)
        state[f"{fqn}.bitmask"] = pack_bitmasks(kept)
        state[f"{fqn}.shape"] = torch.tensor(list(w.shape)).reshape(-1, 1)
        state[f"{fqn}.weight_scale"] = q["weight_scale"]
        expected[fqn] = (q["weight"].float() * q["weight_scale"].float(), q["weight_scale"].reshape(-1).float())
    save_file(state, str(tmp_path / "model.safetensors"))
    config = qcfg.model_dump()
    config["sparsity_config"] = scfg.model_dump()
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    loaded = load_compressed(float_model(), tmp_path)
    ours = fastdistill.quantize_(fastdistill.sparsify_(copy.deepcopy(dense), filter_fn=not_last), filter_fn=not_last)
    for fqn in ("0", "2"):
        layer = loaded.get_submodule(fqn)
        assert type(layer) is fastdistill.sparse.SparseInt8Linear
        assert torch.equal(layer.to_dense(), expected[fqn][0]) and torch.equal(layer.scales, expected[fqn][1])
    assert isinstance(loaded[3], nn.Linear) and torch.equal(loaded[3].weight, dense[3].weight)
    x = torch.randn(5, 40)
    torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-6)


def test_sparse_errors(tmp_path):
    save_compressed(sparse_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["sparsity_config"]["format"] = "sparse-bitmask"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^fastdistill.load_compressed: expected sparsity format 'sparse-24-bitmask'"):
        load_compressed(float_model(), tmp_path)
    save_compressed(sparse_model(), tmp_path)
    wide = nn.Sequential(nn.Linear(40, 28), nn.GELU(), nn.Linear(28, 12, bias=False), nn.Linear(12, 5))
    with pytest.raises(ValueError, match=r"^fastdistill.load_compressed: 0.shape is \[24, 40\], the layer is \[28, 40\]"):
        load_compressed(wide, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    with pytest.raises(ValueError, match=r"^fastdistill.load_compressed: the quantization_config has neither"):
        load_compressed(float_model(), tmp_path)

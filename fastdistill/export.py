"""int8 models in compressed-tensors' "int-quantized" W8A8 layout, which is fastdistill's dynamic scheme exactly
(vLLM and llm-compressor read it): model.safetensors holds, for every Int8Linear `L`, `L.weight` int8 [out, in]
and `L.weight_scale` fp32 [out, 1] (plus `L.bias`); config.json holds a `quantization_config` that says
channel-wise symmetric 8-bit int weights and dynamic per-token symmetric 8-bit int input activations, targets
"Linear", and names every other nn.Linear in `ignore`. Other parameters and buffers are stored as they are.
"""
import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fastdistill.quant import Int8Linear

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _int8_args(strategy: str, dynamic: bool) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": strategy,
            "dynamic": dynamic}


def w8a8_quantization_config(ignore) -> dict:
    """The compressed-tensors quantization_config of fastdistill's dynamic int8 scheme."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "int-quantized",
                                      "weights": _int8_args("channel", False),
                                      "input_activations": _int8_args("token", True),
                                      "output_activations": None}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def save_int8(model: nn.Module, directory, config: Optional[dict] = None) -> Path:
    """Write `model` (whose quantised layers are dynamic-mode Int8Linear) to `directory` as model.safetensors +
    config.json (`config`, e.g. the transformers config as a dict, with quantization_config added)."""
    from safetensors.torch import save_file

    ignore = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, Int8Linear) and mod.mode != "dynamic":
            raise ValueError(f"fastdistill.save_int8: layer {fqn!r} is weight-only int8; the int-quantized layout "
                             f"is W8A8 (quantize_(model, mode='dynamic'))")
        if type(mod).__name__ == "SparseInt8Linear":
            raise ValueError(f"fastdistill.save_int8: layer {fqn!r} is 2:4 + int8, which int-quantized cannot hold")
        if type(mod) is nn.Linear:
            ignore.append(fqn)
    state = {}
    for key, value in model.state_dict().items():
        state[key] = value.detach().contiguous().clone()   # clone: safetensors refuses tensors that share memory
    for fqn, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            state[f"{fqn}.weight_scale"] = state[f"{fqn}.weight_scale"].reshape(-1, 1)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    full = dict(config or {})
    full["quantization_config"] = w8a8_quantization_config(ignore)
    (directory / CONFIG_FILE).write_text(json.dumps(full, indent=2) + "\n")
    return directory


def _matches(fqn: str, mod: nn.Module, patterns) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], fqn):
                return True
        elif p == fqn or p == type(mod).__name__:
            return True
    return False


def _check_scheme(group: dict, name: str):
    w, a = group.get("weights") or {}, group.get("input_activations") or {}
    ok = (w.get("num_bits") == 8 and w.get("type") == "int" and w.get("symmetric") and w.get("strategy") == "channel"
          and not w.get("dynamic") and a.get("num_bits") == 8 and a.get("type") == "int" and a.get("symmetric")
          and a.get("strategy") == "token" and a.get("dynamic") is True)
    if not ok:
        raise ValueError(f"fastdistill.load_int8: config group {name!r} is not fastdistill's W8A8 scheme (8-bit int "
                         f"symmetric channel-wise weights, dynamic per-token symmetric 8-bit int activations): "
                         f"weights={w}, input_activations={a}")


def load_int8(model: nn.Module, directory) -> nn.Module:
    """Load an int-quantized W8A8 checkpoint (config.json + model.safetensors) into `model`, an instance of the
    float architecture: each nn.Linear the config targets (and does not ignore) becomes a dynamic Int8Linear
    holding the stored int8 weight and scales. Returns model (changed in place)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        qcfg = json.loads((directory / CONFIG_FILE).read_text())["quantization_config"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"fastdistill.load_int8: {directory / CONFIG_FILE} has no quantization_config ({exc!r})") from exc
    if qcfg.get("quant_method") != "compressed-tensors" or qcfg.get("format") != "int-quantized":
        raise ValueError(f"fastdistill.load_int8: expected quant_method 'compressed-tensors' with format "
                         f"'int-quantized', got {qcfg.get('quant_method')!r} / {qcfg.get('format')!r}")
    groups = qcfg.get("config_groups") or {}
    for name, group in groups.items():
        _check_scheme(group, name)
    targets = [t for g in groups.values() for t in g.get("targets", [])]
    ignore = qcfg.get("ignore") or []
    state = load_file(str(directory / WEIGHTS_FILE))
    for fqn, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear or not _matches(fqn, mod, targets) or _matches(fqn, mod, ignore):
            continue
        new = Int8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, mode="dynamic",
                         device=mod.weight.device)
        scale_key = f"{fqn}.weight_scale"
        if scale_key not in state:
            raise ValueError(f"fastdistill.load_int8: {WEIGHTS_FILE} has no {scale_key} for targeted layer {fqn!r}")
        state[scale_key] = state[scale_key].reshape(-1).float()
        if mod.bias is not None and f"{fqn}.bias" in state:
            state[f"{fqn}.bias"] = state[f"{fqn}.bias"].float()
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"fastdistill.load_int8: the checkpoint does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model

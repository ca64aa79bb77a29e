"""Interchange with compressed-tensors (vLLM, llm-compressor).

int8 models in compressed-tensors' "int-quantized" W8A8 layout, which is fastdistill's dynamic scheme exactly
(vLLM and llm-compressor read it): model.safetensors holds, for every Int8Linear `L`, `L.weight` int8 [out, in]
and `L.weight_scale` fp32 [out, 1] (plus `L.bias`); config.json holds a `quantization_config` that says
channel-wise symmetric 8-bit int weights and dynamic per-token symmetric 8-bit int input activations, targets
"Linear", and names every other nn.Linear in `ignore`. Other parameters and buffers are stored as they are.

2:4 weights: a converter between fastdistill's canonical (values, meta) and compressed-tensors' legacy
"sparse-24-bitmask" tensors for one weight `L`: `L.compressed` [rows, cols/2] (the kept values, row by row in
ascending column order: exactly our `values`), `L.bitmask` uint8 [rows, ceil(cols/8)] (1 = kept, column c in
bit c % 8 of byte c // 8, little-endian bit order) and `L.shape` int64 [[rows], [cols]].
"""
import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fastdistill.quant import Int8Linear
from fastdistill.sparse.format import check_format, check_k

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
        raise ValueError(f"fastdistill.load_int8: {directory / CONFIG_FILE} has no quantization_config "
                         f"({exc!r})") from exc
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


def to_sparse24_bitmask(values: torch.Tensor, meta: torch.Tensor):
    """Canonical 2:4 (values [N, K/2], meta) -> compressed-tensors' (compressed [N, K/2], bitmask uint8
    [N, ceil(K/8)], shape int64 [[N], [K]])."""
    k = check_format(values, meta, "to_sparse24_bitmask")
    n, g = values.shape[0], k // 4
    codes = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(n, -1)[:, :g].long()
    kept = torch.zeros(n, g, 4, dtype=torch.bool, device=meta.device)
    kept.scatter_(-1, torch.stack([codes & 3, codes >> 2], dim=-1), True)
    if int(kept.sum()) != 2 * n * g:
        raise ValueError("fastdistill.to_sparse24_bitmask: meta is invalid: a group names the same column twice")
    bits = torch.nn.functional.pad(kept.reshape(n, k), (0, -k % 8)).reshape(n, -1, 8).to(torch.uint8)
    bitmask = (bits << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(-1, dtype=torch.uint8)
    return values.contiguous(), bitmask, torch.tensor([[n], [k]], dtype=torch.int64)


def from_sparse24_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape) -> tuple:
    """compressed-tensors' sparse-24-bitmask (compressed, bitmask, shape) -> canonical 2:4 (values, meta). The
    bitmask must keep exactly 2 columns of every group of 4 (as compressed-tensors writes it)."""
    n, k = (int(v) for v in torch.as_tensor(shape).flatten().tolist())
    check_k(k, "from_sparse24_bitmask")
    if (tuple(compressed.shape) != (n, k // 2) or bitmask.dtype != torch.uint8
            or tuple(bitmask.shape) != (n, (k + 7) // 8)):
        raise ValueError(f"fastdistill.from_sparse24_bitmask: for shape [{n}, {k}] expected compressed [{n}, {k // 2}] "
                         f"and uint8 bitmask [{n}, {(k + 7) // 8}], got {list(compressed.shape)} and {bitmask.dtype} "
                         f"{list(bitmask.shape)}")
    bits = (bitmask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=bitmask.device)) & 1
    kept = bits.reshape(n, -1)[:, :k].reshape(n, k // 4, 4).bool()
    if bool((kept.sum(-1) != 2).any()):
        r, grp = (kept.sum(-1) != 2).nonzero()[0].tolist()
        raise ValueError(f"fastdistill.from_sparse24_bitmask: row {r}, columns {4 * grp}..{4 * grp + 3} keep "
                         f"{int(kept[r, grp].sum())} of 4 (the layout keeps exactly 2)")
    sel = kept.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :2].sort(dim=-1).values
    codes = (sel[..., 0] | (sel[..., 1] << 2)).to(torch.uint8)
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    return compressed.contiguous(), (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()

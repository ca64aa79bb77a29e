"""Interchange with compressed-tensors (vLLM, llm-compressor): save_compressed / load_compressed.

int8 layers (Int8Linear, dynamic) in compressed-tensors' "int-quantized" W8A8 layout, which is fastdistill's dynamic
scheme exactly: model.safetensors holds `L.weight` int8 [out, in] and `L.weight_scale` fp32 [out, 1] (plus
`L.bias`); config.json's `quantization_config` says channel-wise symmetric 8-bit int weights and dynamic per-token
symmetric 8-bit int input activations, targets "Linear" and names every other linear layer in `ignore`.

2:4 layers (SparseLinear) in the legacy "sparse-24-bitmask" layout: `L.compressed` [rows, cols/2] (the kept values,
row by row in ascending column order: exactly our `values`), `L.bitmask` uint8 [rows, ceil(cols/8)] (1 = kept,
column c in bit c % 8 of byte c // 8, little-endian bit order) and `L.shape` int64 [[rows], [cols]], with a
`sparsity_config` (format sparse-24-bitmask, structure 2:4, targets "Linear", ignore) inside quantization_config.

2:4 + int8 layers (SparseInt8Linear): both, composed as compressed-tensors' ModelCompressor composed them (the
quantization compressor first, then the sparsity compressor on the int8 weight): `L.compressed` holds the kept int8
values, next to `L.bitmask`, `L.shape` and `L.weight_scale`. (compressed-tensors 0.15+ no longer ships the sparse
compressors; it still defines the sparsity config and the bitmask packing, which the tests check against.)
Other parameters and buffers are stored as they are.
"""
import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fastdistill.fusion import FusedQKV
from fastdistill.quant import Int8Linear
from fastdistill.sparse.format import check_format, check_k
from fastdistill.sparse.modules import SparseInt8Linear, SparseLinear

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SPARSE24_FORMAT = "sparse-24-bitmask"


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


def sparse24_sparsity_config(ignore, global_sparsity: float) -> dict:
    """The compressed-tensors sparsity_config of 2:4 weights stored as sparse-24-bitmask."""
    return {"format": SPARSE24_FORMAT, "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": sorted(ignore),
            "global_sparsity": global_sparsity, "registry_requires_subclass": False}


def save_compressed(model: nn.Module, directory, config: Optional[dict] = None) -> Path:
    """Write `model` to `directory` as a compressed-tensors checkpoint: model.safetensors + config.json (`config`,
    e.g. the transformers config as a dict, with a quantization_config added when any layer is compressed).
    Int8Linear (dynamic) layers: int-quantized W8A8; SparseLinear: sparse-24-bitmask; SparseInt8Linear: both (the
    int8 weight compressed as sparse-24-bitmask, with its weight_scale), as compressed-tensors itself composes a
    quantization and a sparsity compressor. Other tensors are stored as they are."""
    from safetensors.torch import save_file

    kinds = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, Int8Linear) and mod.mode != "dynamic":
            raise ValueError(f"fastdistill.save_compressed: layer {fqn!r} is weight-only int8; the int-quantized "
                             f"layout is W8A8 (quantize_(model, mode='dynamic'))")
        if isinstance(mod, FusedQKV):
            raise ValueError(f"fastdistill.save_compressed: {fqn!r} holds fused Q/K/V projections "
                             f"(quantize_(..., fuse=True)); save the model quantized without fuse")
        if isinstance(mod, Int8Linear) and mod.activation != "none":
            raise ValueError(f"fastdistill.save_compressed: layer {fqn!r} has the fused activation "
                             f"{mod.activation!r}, which the int-quantized layout does not hold (its module's own "
                             f"activation was removed); save the model quantized without fuse")
        kind = _KINDS.get(type(mod))
        if kind is not None:
            kinds[fqn] = kind
    state = {k: v.detach().contiguous().clone()   # clone: safetensors refuses tensors that share memory
             for k, v in model.state_dict().items()}
    # global_sparsity: the pruned share of every number the dense model holds (weights counted as N x K)
    dense_numel = sum(v.numel() for k, v in state.items() if k.rpartition(".")[0] not in kinds)
    dense_numel += sum(m.out_features * (m.in_features + (m.bias is not None))
                       for m in map(model.get_submodule, kinds))
    pruned = 0
    for fqn, kind in kinds.items():
        mod = model.get_submodule(fqn)
        if kind.sparse:
            compressed, bitmask, shape = to_sparse24_bitmask(state.pop(f"{fqn}.values"), state.pop(f"{fqn}.meta"))
            state.update({f"{fqn}.compressed": compressed, f"{fqn}.bitmask": bitmask, f"{fqn}.shape": shape})
            pruned += compressed.numel()
        if kind.int8:
            scale = state.pop(f"{fqn}.scales" if kind.sparse else f"{fqn}.weight_scale")
            state[f"{fqn}.weight_scale"] = scale.reshape(mod.out_features, 1)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    full = dict(config or {})
    full.pop("quantization_config", None)
    linears = [fqn for fqn, mod in model.named_modules() if type(mod) is nn.Linear or type(mod) in _KINDS]
    if any(k.int8 for k in kinds.values()):
        full["quantization_config"] = w8a8_quantization_config(
            [f for f in linears if not (f in kinds and kinds[f].int8)])
    if any(k.sparse for k in kinds.values()):
        qcfg = full.setdefault("quantization_config", {"quant_method": "compressed-tensors"})
        qcfg["sparsity_config"] = sparse24_sparsity_config(
            [f for f in linears if not (f in kinds and kinds[f].sparse)], round(pruned / max(dense_numel, 1), 6))
    (directory / CONFIG_FILE).write_text(json.dumps(full, indent=2) + "\n")
    return directory


class _Kind:
    def __init__(self, sparse: bool, int8: bool):
        self.sparse, self.int8 = sparse, int8


_KINDS = {Int8Linear: _Kind(False, True), SparseLinear: _Kind(True, False), SparseInt8Linear: _Kind(True, True)}


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
        raise ValueError(f"fastdistill.load_compressed: config group {name!r} is not fastdistill's W8A8 scheme (8-bit "
                         f"int symmetric channel-wise weights, dynamic per-token symmetric 8-bit int activations): "
                         f"weights={w}, input_activations={a}")


def _quantization_selection(qcfg: dict):
    """(targets, ignore) of the int-quantized groups, or None without quantization."""
    groups = qcfg.get("config_groups") or {}
    if not groups:
        return None
    if qcfg.get("format") != "int-quantized":
        raise ValueError(f"fastdistill.load_compressed: expected quantization format 'int-quantized', got "
                         f"{qcfg.get('format')!r}")
    for name, group in groups.items():
        _check_scheme(group, name)
    return [t for g in groups.values() for t in g.get("targets", [])], qcfg.get("ignore") or []


def _sparsity_selection(qcfg: dict):
    scfg = qcfg.get("sparsity_config")
    if not scfg:
        return None
    if scfg.get("format") != SPARSE24_FORMAT or scfg.get("sparsity_structure") != "2:4":
        raise ValueError(f"fastdistill.load_compressed: expected sparsity format {SPARSE24_FORMAT!r} with structure "
                         f"'2:4', got {scfg.get('format')!r} / {scfg.get('sparsity_structure')!r}")
    return scfg.get("targets") or [], scfg.get("ignore") or []


def load_compressed(model: nn.Module, directory) -> nn.Module:
    """Load a checkpoint written by save_compressed (or by compressed-tensors in the same layouts) into `model`, an
    instance of the float architecture: each nn.Linear the quantization config targets becomes a dynamic
    Int8Linear, each the sparsity config targets a SparseLinear, each both target a SparseInt8Linear, holding the
    stored weights exactly. Returns model (changed in place)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        qcfg = json.loads((directory / CONFIG_FILE).read_text())["quantization_config"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"fastdistill.load_compressed: {directory / CONFIG_FILE} has no quantization_config "
                         f"({exc!r})") from exc
    if qcfg.get("quant_method") != "compressed-tensors":
        raise ValueError(f"fastdistill.load_compressed: expected quant_method 'compressed-tensors', got "
                         f"{qcfg.get('quant_method')!r}")
    quantized, sparse = _quantization_selection(qcfg), _sparsity_selection(qcfg)
    if quantized is None and sparse is None:
        raise ValueError("fastdistill.load_compressed: the quantization_config has neither int-quantized config "
                         "groups nor a sparsity_config")
    state = load_file(str(directory / WEIGHTS_FILE))

    def take(key, fqn):
        if key not in state:
            raise ValueError(f"fastdistill.load_compressed: {WEIGHTS_FILE} has no {key} for layer {fqn!r}")
        return state.pop(key)

    for fqn, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        is_int8 = quantized is not None and _matches(fqn, mod, quantized[0]) and not _matches(fqn, mod, quantized[1])
        is_sparse = sparse is not None and _matches(fqn, mod, sparse[0]) and not _matches(fqn, mod, sparse[1])
        if not (is_int8 or is_sparse):
            continue
        has_bias, dev = mod.bias is not None, mod.weight.device
        bias = take(f"{fqn}.bias", fqn) if has_bias else None
        if is_sparse:
            shape = take(f"{fqn}.shape", fqn)
            if [int(v) for v in shape.flatten()] != [mod.out_features, mod.in_features]:
                raise ValueError(f"fastdistill.load_compressed: {fqn}.shape is {shape.flatten().tolist()}, the "
                                 f"layer is [{mod.out_features}, {mod.in_features}]")
            values, meta = from_sparse24_bitmask(take(f"{fqn}.compressed", fqn), take(f"{fqn}.bitmask", fqn), shape)
        else:
            weight = take(f"{fqn}.weight", fqn)
        if is_int8:
            scale = take(f"{fqn}.weight_scale", fqn).reshape(-1).float()
        if is_sparse and is_int8:
            new = SparseInt8Linear(mod.in_features, mod.out_features, bias=has_bias, device=dev)
            tensors = {"values": values, "meta": meta, "scales": scale}
        elif is_sparse:
            new = SparseLinear(mod.in_features, mod.out_features, bias=has_bias, dtype=values.dtype, device=dev)
            tensors = {"values": values, "meta": meta}
        else:
            new = Int8Linear(mod.in_features, mod.out_features, bias=has_bias, mode="dynamic", device=dev)
            tensors = {"weight": weight, "weight_scale": scale}
        if has_bias:
            tensors["bias"] = bias.to(new.bias.dtype)
        missing, unexpected = new.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"fastdistill.load_compressed: layer {fqn!r} does not fit: missing {missing}, "
                             f"unexpected {unexpected}")
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the layers just built hold their tensors already
    missing = [k for k in missing if type(model.get_submodule(k.rpartition(".")[0])) not in _KINDS]
    if missing or unexpected:
        raise ValueError(f"fastdistill.load_compressed: the checkpoint does not fit the model: missing {missing}, "
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

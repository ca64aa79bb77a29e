"""The one module-swap walker behind sparsify_ and quantize_ (and any later conversion).

A conversion is a name ("sparsify", "quantize") with a registry from exact module type to converter,
as torchao's quantize_ handlers are. A converter returns the replacement module or raises
CannotConvert(reason); layers it cannot convert stay as they are and are named in one warning.
Types are matched exactly: a subclass of nn.Linear (say, attention's out_proj) is not an nn.Linear
whose forward fastdistill knows.
"""
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

FilterFn = Optional[Callable[[nn.Module, str], bool]]

_CONVERTERS: Dict[str, Dict[type, Callable]] = {}


class CannotConvert(Exception):
    """Raised by a converter: the layer stays as it is; the message says why (it goes into the warning)."""


def register_converter(conversion: str, module_type: type):
    """Decorator: `fn(module, **options) -> nn.Module` converts `module_type` layers for `conversion`."""
    def register(fn):
        _CONVERTERS.setdefault(conversion, {})[module_type] = fn
        return fn
    return register


def named_layers(model: nn.Module, types: Tuple[type, ...], filter_fn: FilterFn = None) -> Iterator[Tuple[str, nn.Module]]:
    """(fqn, module) for every module whose exact type is in `types` and that filter_fn(module, fqn) accepts.
    The model itself is included (fqn "")."""
    for fqn, mod in model.named_modules():
        if type(mod) in types and (filter_fn is None or filter_fn(mod, fqn)):
            yield fqn, mod


def convert_modules(model: nn.Module, conversion: str, filter_fn: FilterFn = None, **options) -> nn.Module:
    """Replace, in place, every layer of `model` with a converter registered for `conversion`; returns
    `model`, or the replacement when `model` itself is such a layer."""
    converters = _CONVERTERS[conversion]
    skipped = []
    replaced_top = None
    for fqn, mod in list(named_layers(model, tuple(converters), filter_fn)):
        try:
            new = converters[type(mod)](mod, **options)
        except CannotConvert as why:
            skipped.append(f"{fqn or '<model>'} ({why})")
            continue
        if not fqn:
            replaced_top = new
            break
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if skipped:
        warnings.warn(f"fastdistill.{conversion}_: left {len(skipped)} layer(s) unconverted: " + ", ".join(skipped),
                      stacklevel=3)
    return model if replaced_top is None else replaced_top


# ---------------------------------------------------------------- convolution chains (BatchNorm folding, fusions)
# torch's activation modules an int8 epilogue (linear and conv) applies, by the op's activation name.
EPILOGUE_RELUS = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def called_once(model: nn.Module) -> Dict[str, nn.Module]:
    """fqn -> module for the modules that appear once in the module tree (a module reachable under two names could
    be called from two places)."""
    seen: Dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        seen[id(mod)] = seen.get(id(mod), 0) + 1
    return {fqn: mod for fqn, mod in model.named_modules() if seen[id(mod)] == 1}


def conv_chains(model: nn.Module) -> Dict[str, Tuple[Optional[str], Optional[str]]]:
    """{conv fqn: (BatchNorm2d fqn or None, ReLU/ReLU6 fqn or None)}: for each nn.Conv2d the module calls once, the
    BatchNorm2d that alone reads its output, and the activation that alone reads what comes out of the two. Found by
    tracing the forward with torch.fx, so only data flow counts (a module called twice, an output read twice, is no
    chain). A model torch.fx cannot trace falls back to the consecutive children of its nn.Sequential containers,
    whose forward is that chain by definition."""
    once = called_once(model)
    try:
        from torch import fx
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: no data-flow view, use the containers
        return _sequential_chains(model, once)
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def single(node, types):
        """The module node that is node's only user, reads only node, and is of one of `types` (else None)."""
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if (user.op != "call_module" or calls.get(user.target) != 1 or user.target not in once
                or type(once[user.target]) not in types or list(user.all_input_nodes) != [node] or user.kwargs):
            return None
        return user

    chains = {}
    for node in graph.nodes:
        if (node.op != "call_module" or calls.get(node.target) != 1 or node.target not in once
                or type(once[node.target]) is not nn.Conv2d):
            continue
        bn = single(node, (nn.BatchNorm2d,))
        act = single(bn if bn is not None else node, tuple(EPILOGUE_RELUS))
        chains[node.target] = (bn.target if bn is not None else None, act.target if act is not None else None)
    return chains


def _sequential_chains(model, once):
    chains = {}
    for fqn, mod in model.named_modules():
        if type(mod) is not nn.Sequential:
            continue
        children = list(mod.named_children())
        for i, (name, child) in enumerate(children):
            full = f"{fqn}.{name}" if fqn else name
            if type(child) is not nn.Conv2d or full not in once:
                continue
            bn = act = None
            j = i + 1
            if j < len(children) and type(children[j][1]) is nn.BatchNorm2d:
                bn, j = (f"{fqn}.{children[j][0]}" if fqn else children[j][0]), j + 1
            if j < len(children) and type(children[j][1]) in EPILOGUE_RELUS:
                act = f"{fqn}.{children[j][0]}" if fqn else children[j][0]
            chains[full] = (bn if bn in once else None, act if act in once else None)
    return chains


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """Fold every eval-mode nn.BatchNorm2d that alone reads an nn.Conv2d's output into that conv, in place: with
    a = gamma / sqrt(running_var + eps), the conv's weight becomes w * a (per output channel) and its bias
    (b - running_mean) * a + beta (created when the conv had none), and the BatchNorm2d becomes nn.Identity. Exact up
    to the rounding of the folded weights (the arithmetic runs in float64, then rounds once to the weight's dtype).

    A BatchNorm2d in training mode, or one without running statistics (track_running_stats=False: it normalises
    with each batch's statistics even in eval), is left as it is and named in one warning. Which BatchNorm follows
    which conv comes from conv_chains (torch.fx data flow). Returns model."""
    skipped = []
    for conv_fqn, (bn_fqn, _) in conv_chains(model).items():
        if bn_fqn is None:
            continue
        conv, bn = model.get_submodule(conv_fqn), model.get_submodule(bn_fqn)
        if bn.training:
            skipped.append(f"{bn_fqn} (training mode: call model.eval() first)")
            continue
        if bn.running_mean is None or bn.running_var is None:
            skipped.append(f"{bn_fqn} (no running statistics: track_running_stats=False)")
            continue
        if bn.num_features != conv.out_channels:
            skipped.append(f"{bn_fqn} ({bn.num_features} features after {conv.out_channels} conv channels)")
            continue
        w = conv.weight
        a = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            a = a * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(a)
        bias = (bias - bn.running_mean.double()) * a
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        w.copy_((w.double() * a.reshape(-1, 1, 1, 1)).to(w.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))
        replace_module(model, bn_fqn, nn.Identity())
    if skipped:
        warnings.warn(f"fastdistill.fold_batchnorm_: left {len(skipped)} BatchNorm2d layer(s) unfolded: "
                      + ", ".join(skipped), stacklevel=2)
    return model

"""The one module-swap walker behind sparsify_ and quantize_ (and any later conversion).

A conversion is a name ("sparsify", "quantize") with a registry from exact module type to converter,
as torchao's quantize_ handlers are. A converter returns the replacement module or raises
CannotConvert(reason); layers it cannot convert stay as they are and are named in one warning.
Types are matched exactly: a subclass of nn.Linear (say, attention's out_proj) is not an nn.Linear
whose forward fastdistill knows.
"""
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

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

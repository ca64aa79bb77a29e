"""Model-level int8 fusions. For transformers BERT-style encoders: `quantize_(model, fuse=True)`, or fuse_int8_(model)
on a model quantize_ (and sparsify_ + quantize_) already converted. For CNNs: fuse_conv_blocks_ (the section at the
end), which quantize_ applies to eval-mode models with convs.

Mechanism: a module rewrite, after conversion, on the model as transformers built it (no compile pass, so eager and
torch.compile run the same fused modules).

- Self-attention (a transformers `*SelfAttention` module whose query, key and value are Int8Linear (dynamic, no
  activation) or SparseInt8Linear layers of one type reading the same K features): the three weights, scales and
  biases are concatenated at conversion into one layer `qkv` (N = Nq + Nk + Nv), so one call quantizes the input
  once and runs one GEMM; its output is split into the three projections. Each output row is quantized with its own
  per-token scale and every output column has its own weight scale, so the split equals the three separate layers
  bit for bit. The module's class becomes a subclass whose forward is the installed transformers class's own source
  with its three calls self.query(x), self.key(x), self.value(x) (each exactly once, on the forward's first input)
  replaced by the parts of one `self.qkv(x)` at its start; everything else (attention interface, cache) is
  transformers' code as installed.
- FFN (an `*Intermediate` module: `dense` an Int8Linear (dynamic), `intermediate_act_fn` a GELU (erf or tanh form),
  ReLU or ReLU6): the activation moves into the GEMM's epilogue (Int8Linear.activation) and the module's activation
  becomes the identity. The epilogue's GELU is fastdistill's fp32 one, not PyTorch's (a few fp32 units apart), so
  the model is not bit for bit the unfused one: a unit in the last place can flip an int8 rounding of the next
  layer's quantized input. It is as faithful to the float model (tests/test_int8_fusion.py compares both with it).

Recognition is structural (class names, attribute types, the forward's source) and then checked: the rewritten module
runs once on a random probe input against the original, bit for bit for attention and within rounding for the FFN;
anything that differs, raises, or does not match keeps the unfused path. The fused attention's state_dict holds
`qkv.*` instead of query/key/value (save_compressed refuses it: save before fusing).
"""
import ast
import inspect
import operator
import sys
import textwrap
from typing import Dict, Optional, Set

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastdistill.convert import EPILOGUE_RELUS, called_once
from fastdistill.quant import Int8Conv2d, Int8Linear
from fastdistill.sparse.modules import SparseInt8Linear

# transformers' activation classes (by name: they moved between versions) and torch's, as epilogue activations.
_ACTIVATIONS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "ReLU": "relu"}


class FusedQKV(nn.Module):
    """One int8 GEMM for projections that read the same input: `proj` (Int8Linear or SparseInt8Linear) holds the
    concatenated weights; forward returns the projections' outputs (views of one [..., sum(sizes)] tensor)."""

    def __init__(self, proj: nn.Module, sizes):
        super().__init__()
        self.proj, self.sizes = proj, [int(s) for s in sizes]

    @classmethod
    def from_layers(cls, layers) -> "FusedQKV":
        first = layers[0]
        sizes = [m.out_features for m in layers]
        n, k, dev = sum(sizes), first.in_features, _device(first)
        has_bias = any(m.bias is not None for m in layers)
        # A missing bias is zeros: fma(acc, scale, 0) rounds as acc * scale does.
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, device=dev) for m in layers]) \
            if has_bias else None
        with torch.no_grad():
            if isinstance(first, Int8Linear):
                proj = Int8Linear(k, n, bias=has_bias, mode="dynamic", device=dev)
                proj.set_int8_weight(torch.cat([m.int8_weight() for m in layers]),
                                     torch.cat([m.weight_scale for m in layers]))
            else:
                proj = SparseInt8Linear(k, n, bias=has_bias, device=dev)
                proj.values.copy_(torch.cat([m.values for m in layers]))
                proj.meta.copy_(torch.cat([m.meta for m in layers]))
                proj.scales.copy_(torch.cat([m.scales for m in layers]))
            if has_bias:
                proj.bias.copy_(bias)
        return cls(proj, sizes)

    def forward(self, x: torch.Tensor):
        return self.proj(x).split(self.sizes, dim=-1)

    def extra_repr(self):
        return f"sizes={self.sizes}"


def _device(layer: nn.Module) -> torch.device:
    return (layer.weight_scale if isinstance(layer, Int8Linear) else layer.scales).device


def _fusable_projections(mod: nn.Module):
    layers = [getattr(mod, name, None) for name in ("query", "key", "value")]
    kind = type(layers[0])
    if kind not in (Int8Linear, SparseInt8Linear) or any(type(m) is not kind for m in layers):
        return None
    if kind is Int8Linear and any(m.mode != "dynamic" or m.activation != "none" for m in layers):
        return None
    if len({m.in_features for m in layers}) != 1:
        return None
    return layers


_FUSED_CLASSES: Dict[type, Optional[type]] = {}
_PROJ = {"query": "_fd_q", "key": "_fd_k", "value": "_fd_v"}


class _TakeFused(ast.NodeTransformer):
    """`self.query(x)` / `self.key(x)` / `self.value(x)` (x the forward's first input) -> the fused call's parts."""

    def __init__(self, x: str):
        self.x, self.seen = x, []

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr in _PROJ and isinstance(f.value, ast.Name) and f.value.id == "self"
                and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Name)
                and node.args[0].id == self.x):
            self.seen.append(f.attr)
            return ast.copy_location(ast.Name(id=_PROJ[f.attr], ctx=ast.Load()), node)
        return node


def _fused_attention_class(cls: type) -> Optional[type]:
    """A subclass of transformers' self-attention class whose forward is the class's own source with the three
    projection calls replaced by one fused call at its start (so it follows whatever the installed transformers does
    with q, k and v: attention interfaces, caches); None when the source does not have that shape: each of
    self.query / self.key / self.value called exactly once, on the forward's first input."""
    if cls in _FUSED_CLASSES:
        return _FUSED_CLASSES[cls]
    fused = None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
        fn = tree.body[0]
        args = fn.args.args
        if isinstance(fn, ast.FunctionDef) and len(args) >= 2 and args[0].arg == "self":
            x = args[1].arg
            taker = _TakeFused(x)
            fn.body = [taker.visit(stmt) for stmt in fn.body]
            if sorted(taker.seen) == sorted(_PROJ):
                fn.body.insert(0, ast.parse(f"_fd_q, _fd_k, _fd_v = self.qkv({x})").body[0])
                ast.fix_missing_locations(tree)
                namespace = dict(vars(sys.modules[cls.__module__]))
                exec(compile(tree, f"<fastdistill fused {cls.__qualname__}.forward>", "exec"), namespace)
                fused = type("Int8Fused" + cls.__name__, (cls,), {"forward": namespace[fn.name], "__module__": __name__})
    except (OSError, TypeError, SyntaxError, KeyError, IndexError):
        fused = None
    _FUSED_CLASSES[cls] = fused
    return fused


def _probe_input(k: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, k, generator=g).to(device)


def _run(mod, x):
    was_training = mod.training
    mod.eval()
    try:
        with torch.no_grad():
            out = mod(x)
    finally:
        mod.train(was_training)
    return out[0] if isinstance(out, tuple) else out


def _fuse_attention(mod: nn.Module) -> bool:
    cls = type(mod)
    if not cls.__name__.endswith("SelfAttention") or not cls.__module__.startswith("transformers."):
        return False
    layers = _fusable_projections(mod)
    fused_class = _fused_attention_class(cls) if layers is not None else None
    if fused_class is None:
        return False
    x = _probe_input(layers[0].in_features, _device(layers[0]))
    try:
        ref = _run(mod, x)
        qkv = FusedQKV.from_layers(layers)
        mod.__class__ = fused_class
        for name in _PROJ:
            delattr(mod, name)
        mod.qkv = qkv
        if torch.equal(_run(mod, x), ref):
            return True
    except Exception:  # noqa: BLE001 (anything the rewrite did not foresee: keep the unfused path)
        pass
    mod.__class__ = cls
    mod._modules.pop("qkv", None)
    for name, layer in zip(_PROJ, layers):
        setattr(mod, name, layer)
    return False


def _epilogue_activation(act: nn.Module) -> Optional[str]:
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) in EPILOGUE_RELUS:
        return EPILOGUE_RELUS[type(act)]
    if type(act).__module__.startswith("transformers."):
        return _ACTIVATIONS.get(type(act).__name__)
    return None


def _fuse_intermediate(mod: nn.Module) -> bool:
    cls = type(mod)
    dense, act = getattr(mod, "dense", None), getattr(mod, "intermediate_act_fn", None)
    if (not cls.__name__.endswith("Intermediate") or type(dense) is not Int8Linear or dense.mode != "dynamic"
            or dense.activation != "none" or not isinstance(act, nn.Module)):
        return False
    name = _epilogue_activation(act)
    if name is None:
        return False
    x = _probe_input(dense.in_features, dense.weight_scale.device)
    try:
        ref = _run(mod, x)
        dense.activation, mod.intermediate_act_fn = name, nn.Identity()
        out = _run(mod, x)
        # the epilogue's activation against PyTorch's: fp32 rounding of the activation, no structural difference
        if out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * (1 + ref.abs().max().item())):
            return True
    except Exception:  # noqa: BLE001
        pass
    dense.activation, mod.intermediate_act_fn = "none", act
    return False


def fuse_int8_(model: nn.Module, qkv: bool = True, ffn_activation: bool = True) -> Dict[str, int]:
    """Apply the fusions above in place (Q/K/V, the FFN activation, or both); returns how many modules of each kind
    were fused."""
    counts = {"qkv": 0, "ffn_activation": 0}
    for mod in list(model.modules()):
        if qkv and _fuse_attention(mod):
            counts["qkv"] += 1
        elif ffn_activation and _fuse_intermediate(mod):
            counts["ffn_activation"] += 1
    return counts


# ---------------------------------------------------------------- CNN blocks: residual add and activation
# quantize_ fuses a ReLU module that alone reads a conv (convert.conv_chains). A residual block's add, and a ReLU
# module its forward calls twice (torchvision's BasicBlock, Bottleneck), need the block's data flow: each block whose
# children include an Int8Conv2d (directly or in nn.Sequential containers) is traced with torch.fx, its other
# children as leaves, and where it fuses something it is replaced in its parent by the rewritten
# torch.fx.GraphModule (the same submodules under the same names, so the same state_dict).
_RESIDUAL_ADDS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCTIONS = {torch.relu: "relu", torch.relu_: "relu", F.relu: "relu", F.relu6: "relu6"}


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one block's forward with its children as leaves, except containers (nn.Sequential and subclasses),
    whose forward is their children's chain."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not isinstance(m, nn.Sequential)


def _has_direct_conv(block: nn.Module) -> bool:
    """An Int8Conv2d among block's children, looking through nn.Sequential containers."""
    return any(type(c) is Int8Conv2d or (isinstance(c, nn.Sequential) and _has_direct_conv(c))
               for c in block.children())


def _activation_of(node: fx.Node, block: nn.Module) -> Optional[str]:
    """'relu' / 'relu6' if node applies one to its only input (a module call or a function), else None."""
    if node.op == "call_module":
        return EPILOGUE_RELUS.get(type(block.get_submodule(node.target)))
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS and len(node.args) == 1:
        return _RELU_FUNCTIONS[node.target]
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse_block(block: nn.Module, once: Set[int]) -> Optional[fx.GraphModule]:
    """The block rewritten with its convs' residual adds and activations in their epilogues, or None if nothing
    fuses (or torch.fx cannot trace it)."""
    try:
        graph = _ChildrenAsLeaves().trace(block)
    except Exception:  # noqa: BLE001 - untraceable forward: left as it is
        return None
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):  # folded BatchNorms: pass-throughs
        if node.op == "call_module" and type(block.get_submodule(node.target)) is nn.Identity and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    fused = False
    for conv_node in list(graph.nodes):
        if conv_node.op != "call_module" or calls[conv_node.target] != 1 or len(conv_node.args) != 1 \
                or conv_node.kwargs:
            continue
        conv = block.get_submodule(conv_node.target)
        if type(conv) is not Int8Conv2d or conv.activation != "none" or id(conv) not in once:
            continue
        add = _only_user(conv_node)
        if add is not None and add.op == "call_function" and add.target in _RESIDUAL_ADDS and not add.kwargs \
                and len(add.args) == 2 and all(isinstance(a, fx.Node) for a in add.args) \
                and add.args[0] is not add.args[1]:
            residual = add.args[1] if add.args[0] is conv_node else add.args[0]
            act_node = _only_user(add)
            activation = _activation_of(act_node, block) if act_node is not None else None
            last = act_node if activation is not None else add
            conv.activation = activation or "none"
            with graph.inserting_before(last):
                new = graph.call_module(conv_node.target, (conv_node.args[0],), {"residual": residual})
            last.replace_all_uses_with(new)
            for dead in ((act_node, add, conv_node) if activation is not None else (add, conv_node)):
                graph.erase_node(dead)
            fused = True
            continue
        act_node = _only_user(conv_node)
        activation = _activation_of(act_node, block) if act_node is not None else None
        if activation is not None:  # e.g. a ReLU module the forward also calls elsewhere
            conv.activation = activation
            act_node.replace_all_uses_with(conv_node)
            graph.erase_node(act_node)
            fused = True
    if not fused:
        return None
    graph.lint()
    return fx.GraphModule(block, graph, class_name=type(block).__name__)


def fuse_conv_blocks_(model: nn.Module) -> int:
    """Fuse residual adds (and the activation after them) and the remaining conv activations of the blocks below
    `model` into their Int8Conv2d epilogues, in place (the model itself is not rewritten, only its descendants);
    returns how many blocks were rewritten."""
    once = {id(mod) for mod in called_once(model).values()}
    rewritten = 0
    for fqn, block in reversed(list(model.named_modules())):
        if not fqn or not _has_direct_conv(block) or id(block) not in once:
            continue
        new = _fuse_block(block, once)
        if new is not None:
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, new)
            rewritten += 1
    return rewritten

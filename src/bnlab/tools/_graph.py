"""Where each BN layer sits in a model: what feeds it, what it feeds, how often it is called.

The tools share one analysis. It traces the model with :mod:`torch.fx` (BN layers are leaves,
so bnlab's layers are not traced through) and, when the model cannot be traced (data-dependent
control flow, unsupported calls), falls back to module order: neighbours inside an
``nn.Sequential``. Which of the two was used is returned with the reason, so callers can say so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._base import _NormBase
from .._checks import check_module

__all__ = ["BN_TYPES", "BNSite", "Analysis", "analyse", "bn_layers", "is_bn"]

#: Every class the tools treat as batch normalisation. torch's InstanceNorm derives from
#: torch's ``_NormBase`` but not from ``_BatchNorm``, so it is (correctly) not in here.
BN_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, _NormBase)


def is_bn(module: nn.Module) -> bool:
    """``True`` for torch's and bnlab's batch-norm layers."""
    return isinstance(module, BN_TYPES)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for every distinct BN layer, in registration order."""
    check_module("bn_layers", "model", model)
    return [(n, m) for n, m in model.named_modules() if is_bn(m)]


@dataclass
class BNSite:
    """One BN layer and its neighbours.

    ``prev``/``next`` are qualified module names (``None`` when the neighbour is not a module
    call); ``prev_op``/``next_op`` describe the neighbour in words either way.
    ``prev_exclusive``: the previous module is called once and its output feeds only this BN.
    ``next_exclusive``: this BN's output feeds only the next module, which is called once and
    takes it as its only input.
    """

    name: str
    calls: int | None
    prev: str | None = None
    prev_op: str = "unknown"
    prev_exclusive: bool = False
    next: str | None = None
    next_op: str = "unknown"
    next_exclusive: bool = False


@dataclass
class Analysis:
    method: str  # "fx" or "module-order"
    reason: str  # why module order was used ("" with fx)
    sites: dict[str, BNSite] = field(default_factory=dict)
    names: dict[int, list[str]] = field(default_factory=dict)  # id(module) -> all its names


class _BNLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_bn(m) or super().is_leaf_module(m, qualname)


def _all_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return node.op  # placeholder, get_attr, output


def _analyse_fx(model: nn.Module, graph: fx.Graph, names: dict[int, list[str]]) -> Analysis:
    out = Analysis("fx", "", names=names)
    calls: Counter[int] = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(model.get_submodule(node.target))] += 1
    for name, bn in bn_layers(model):
        out.sites[name] = BNSite(name, calls.get(id(bn), 0))
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        mod = model.get_submodule(node.target)
        if not is_bn(mod):
            continue
        site = out.sites[names[id(mod)][0]]
        if site.calls != 1:
            continue
        if node.args and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            site.prev_op = _describe(src)
            if src.op == "call_module":
                site.prev = src.target
                site.prev_exclusive = (
                    len(src.users) == 1 and calls[id(model.get_submodule(src.target))] == 1
                )
        users = list(node.users)
        if len(users) == 1:
            dst = users[0]
            site.next_op = _describe(dst)
            if dst.op == "call_module":
                site.next = dst.target
                site.next_exclusive = (
                    calls[id(model.get_submodule(dst.target))] == 1
                    and len(dst.args) == 1
                    and dst.args[0] is node
                    and not dst.kwargs
                )
        elif users:
            site.next_op = f"{len(users)} consumers"
    return out


def _analyse_order(model: nn.Module, names: dict[int, list[str]], reason: str) -> Analysis:
    out = Analysis("module-order", reason, names=names)
    for name, bn in bn_layers(model):
        # Without a graph we only know a layer is used once if it is registered once.
        out.sites[name] = BNSite(name, None if len(names[id(bn)]) == 1 else len(names[id(bn)]))
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq._modules.items())
        for i, (_, child) in enumerate(children):
            if not is_bn(child) or names[id(child)][0] not in out.sites:
                continue
            site = out.sites[names[id(child)][0]]
            if site.calls is not None:
                continue
            site.calls = 1  # registered once, called by its nn.Sequential
            prefix = f"{seq_name}." if seq_name else ""
            if i > 0:
                pname, prev = children[i - 1]
                site.prev, site.prev_op = prefix + pname, f"module {prefix + pname}"
                site.prev_exclusive = len(names[id(prev)]) == 1
            if i + 1 < len(children):
                nname, nxt = children[i + 1]
                site.next, site.next_op = prefix + nname, f"module {prefix + nname}"
                site.next_exclusive = len(names[id(nxt)]) == 1
    return out


def analyse(model: nn.Module) -> Analysis:
    """Trace ``model`` (fx, BN layers as leaves) or fall back to ``nn.Sequential`` order."""
    names = _all_names(model)
    try:
        graph = _BNLeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "use module order"
        reason = f"torch.fx could not trace the model ({type(exc).__name__}: {exc})"
        return _analyse_order(model, names, reason.splitlines()[0][:300])
    return _analyse_fx(model, graph, names)


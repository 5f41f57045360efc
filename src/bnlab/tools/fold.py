r"""Fold evaluation-mode BN layers into the neighbouring convolution or linear layer.

In evaluation a BN layer is a per-channel affine map :math:`y = s \odot x + t` with

.. math::

    s = \frac{\gamma}{\sqrt{\hat\sigma^2 + \epsilon}}, \qquad t = \beta - \hat\mu\, s,

:math:`\hat\mu, \hat\sigma^2` the running mean and (unbiased) running variance, all ``(C,)``.

* **Layer then BN** (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear): scale the output channels,
  :math:`W' = W \odot s`, :math:`b' = (b - \hat\mu) s + \beta`.
* **BN then layer** (Linear, or a convolution with zero padding): scale the input channels,
  :math:`W' = W \odot s`, :math:`b' = b + W t`. With padding the border would see the padded
  zeros instead of :math:`t`, so padded convolutions are never folded this way.

:func:`fold` finds the pairs with :mod:`torch.fx` (so branches and functional calls work) or,
for models fx cannot trace, with ``nn.Sequential`` order, replaces each folded BN by
``nn.Identity`` in a deep copy and reports what it did and what it could not do.

A folded model is saved as a ``bnlab.folded.v1`` file (what ``bnlab fold`` writes, readable
with ``torch.load(weights_only=True)``): :func:`folded_checkpoint` builds its contents and
:func:`load_folded` rebuilds the module from it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._base import _NormBase
from .._checks import check_bool, check_module, check_real_weights
from .._state import bad_values
from .._tree import copy_model
from ._graph import BNSite, analyse, bn_layers, is_bn

__all__ = [
    "FOLDED_FORMAT",
    "FoldReport",
    "bn_scale_shift",
    "fold",
    "folded_checkpoint",
    "load_folded",
    "fold_bn_next_weights",
    "fold_conv_bn",
    "fold_conv_bn_weights",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def bn_scale_shift(
    mean: Tensor, var: Tensor, eps: float, gamma: Tensor | None, beta: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The evaluation-mode BN as ``y = s * x + t``; returns ``(s, t)`` in float64."""
    s = torch.rsqrt(var.double() + eps)
    if gamma is not None:
        s = s * gamma.double()
    t = -mean.double() * s
    if beta is not None:
        t = t + beta.double()
    return s, t


def fold_conv_bn_weights(
    w: Tensor,
    b: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gamma: Tensor | None,
    beta: Tensor | None,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of ``layer`` followed by BN as one layer. Returns ``(w', b')`` in ``w.dtype``.

    ``w`` is a convolution weight ``(C_out, C_in/groups, *k)``, a transposed convolution weight
    ``(C_in, C_out/groups, *k)`` (``transpose=True``) or a linear weight ``(C_out, C_in)``;
    ``b`` is ``(C_out,)`` or ``None``; the BN tensors are ``(C_out,)``.
    """
    s, t = bn_scale_shift(mean, var, eps, gamma, beta)
    wd = w.double()
    if transpose:
        cin, per_group = w.shape[0], w.shape[1]
        view = wd.reshape(groups, cin // groups, per_group, *w.shape[2:])
        scale = s.reshape(groups, 1, per_group, *([1] * (w.dim() - 2)))
        new_w = (view * scale).reshape(w.shape)
    else:
        new_w = wd * s.reshape(-1, *([1] * (w.dim() - 1)))
    b0 = torch.zeros_like(s) if b is None else b.double()
    new_b = b0 * s + t
    return new_w.to(w.dtype), new_b.to(w.dtype)


def fold_bn_next_weights(
    w: Tensor,
    b: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gamma: Tensor | None,
    beta: Tensor | None,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of BN followed by ``layer`` (linear, or convolution without padding).

    ``w`` is ``(C_out, C_in/groups, *k)`` or ``(C_out, C_in)``; the BN tensors are ``(C_in,)``.
    Returns ``(w', b')`` with ``b'`` of shape ``(C_out,)``, in ``w.dtype``.
    """
    s, t = bn_scale_shift(mean, var, eps, gamma, beta)
    cout, per_group = w.shape[0], w.shape[1]
    k = [1] * (w.dim() - 2)
    view = w.double().reshape(groups, cout // groups, per_group, *w.shape[2:])
    new_w = (view * s.reshape(groups, 1, per_group, *k)).reshape(w.shape)
    shift = (view * t.reshape(groups, 1, per_group, *k)).sum(dim=tuple(range(2, view.dim())))
    b0 = torch.zeros(cout, dtype=torch.float64, device=w.device) if b is None else b.double()
    new_b = b0 + shift.reshape(cout)
    return new_w.to(w.dtype), new_b.to(w.dtype)


def _bn_tensors(bn: nn.Module) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]:
    return bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias


def _bad_bn(bn: nn.Module) -> tuple[str, str]:
    """The first BN tensor that folding would turn into non-finite weights, as
    ``(key, what is wrong)``; ``("", "")`` when every one is fine."""
    for key, variance in (("running_mean", False), ("running_var", True), ("weight", False),
                          ("bias", False)):
        t = getattr(bn, key, None)
        words = "" if t is None else bad_values(t.detach(), variance)
        if words:
            return key, words
    return "", ""


def _check_merged(bn_name: str, layer_name: str, layer: nn.Module) -> None:
    for key in ("weight", "bias"):
        words = bad_values(getattr(layer, key).detach(), False)
        if words:
            raise ValueError(
                f"fold: folding BN layer {bn_name!r} into {layer_name!r} gives a {key} with "
                f"{words} (the product overflows {getattr(layer, key).dtype}); fold in a wider "
                "dtype (model.double()) or check the BN weight and running_var"
            )


def _example_tensors(x) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _example_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _example_tensors(v)]
    return []


def _check_example(example_input) -> None:
    for t in _example_tensors(example_input):
        if t.is_meta:
            raise ValueError("fold: example_input is on the meta device (a shape without values); "
                             "pass a real tensor on the model's device")
        if t.dim() and t.shape[0] == 0:
            raise ValueError(
                f"fold: example_input has an empty batch (shape {tuple(t.shape)}); the fold "
                "cannot be checked on 0 samples: pass at least one"
            )


def _all_finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _example_tensors(out)
               if t.is_floating_point() or t.is_complex())


def _set_weights(layer: nn.Module, w: Tensor, b: Tensor) -> None:
    layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)


@torch.no_grad()
def fold_conv_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new layer equal to ``bn(layer(x))`` in evaluation; both inputs are left untouched.

    ``layer`` is a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear; ``bn`` must be in
    evaluation mode with running statistics.
    """
    if not isinstance(layer, _CONV + _CONVT + (nn.Linear,)):
        raise TypeError("fold_conv_bn: layer must be a Conv1d/2d/3d, ConvTranspose1d/2d/3d or "
                        f"Linear, got {type(layer).__name__}")
    if not is_bn(bn):
        raise TypeError(f"fold_conv_bn: bn must be a torch or bnlab BN layer, got "
                        f"{type(bn).__name__}")
    why = _why_not_foldable(bn)
    if why:
        raise ValueError(f"fold_conv_bn: bn cannot be folded: {why}")
    key, words = _bad_bn(bn)
    if key:
        raise ValueError(f"fold_conv_bn: bn: {key} holds {words}; the folded weights would not "
                         "be finite")
    out_ch = layer.out_channels if isinstance(layer, _CONV + _CONVT) else layer.out_features
    if out_ch != bn.num_features:
        raise ValueError(
            f"fold_conv_bn: layer has {out_ch} output channels but bn has "
            f"num_features={bn.num_features}; they must match"
        )
    new = copy.deepcopy(layer)
    w, b = fold_conv_bn_weights(
        layer.weight, layer.bias, *_bn_tensors(bn),
        transpose=isinstance(layer, _CONVT), groups=getattr(layer, "groups", 1),
    )
    _set_weights(new, w, b)
    return new


def _why_not_foldable(bn: nn.Module) -> str:
    if bn.training:
        return "it is in training mode (call model.eval() first)"
    if not bn.track_running_stats or bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False uses batch statistics)"
    if isinstance(bn, _NormBase) and bn._activation()[0] != "identity":
        return (f"{type(bn).__name__} applies {bn._activation()[0]} after its affine map "
                "(use act='identity' and a separate activation to fold it)")
    if isinstance(bn, _NormBase) and not bn.eval_is_affine():
        return f"{type(bn).__name__} does not evaluate as an affine map (eval_is_affine)"
    return ""


def _zero_padding(conv: nn.Module) -> bool:
    p = conv.padding
    if isinstance(p, str):
        return p == "valid" or all(k == 1 for k in conv.kernel_size)
    return all(int(v) == 0 for v in p)


@dataclass
class FoldReport:
    """What :func:`fold` did. ``folded`` rows: ``(bn, layer, "into previous"|"into next")``."""

    method: str
    reason: str = ""
    folded: list[tuple[str, str, str]] = field(default_factory=list)
    not_folded: list[tuple[str, str]] = field(default_factory=list)
    max_abs_error: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"folded {len(self.folded)} BN layer(s) (graph: {self.method})"]
        if self.reason:
            lines.append(f"  note: {self.reason}")
        lines += [f"  {bn} -> {layer} ({how})" for bn, layer, how in self.folded]
        lines += [f"  not folded: {bn}: {why}" for bn, why in self.not_folded]
        if self.max_abs_error is not None:
            lines.append(f"  max abs error on example_input: {self.max_abs_error:.3g}")
        return "\n".join(lines)


def _input_ranks(model: nn.Module, example_input) -> dict[str, int]:
    ranks: dict[str, int] = {}

    def record(name: str):
        def hook(module, args):  # a pre-hook that returns something replaces the input
            ranks.setdefault(name, args[0].dim())

        return hook

    handles = [bn.register_forward_pre_hook(record(n)) for n, bn in bn_layers(model)]
    try:
        with torch.no_grad():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return ranks


def _call(model: nn.Module, example_input):
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _try_prev(site: BNSite, bn: nn.Module, model: nn.Module, ranks: dict[str, int]) -> str:
    """Fold into the previous layer; returns "" on success or why not."""
    if site.prev is None or not site.prev_exclusive:
        return f"input comes from {site.prev_op}" + (
            "" if site.prev is None else " whose output is used elsewhere or which is reused"
        )
    layer = model.get_submodule(site.prev)
    if not isinstance(layer, _CONV + _CONVT + (nn.Linear,)):
        return f"input comes from {site.prev_op} ({type(layer).__name__})"
    if isinstance(layer, nn.Linear) and ranks.get(site.name) != 2:
        return "Linear -> BN folds only for 2D (N, C) input; pass example_input to prove it"
    if not isinstance(layer, nn.Linear) and ranks.get(site.name, 0) not in (0, layer.weight.dim()):
        return f"{site.prev} is called on an unbatched input (BN's dim 1 is not its channels)"
    w, b = fold_conv_bn_weights(
        layer.weight, layer.bias, *_bn_tensors(bn),
        transpose=isinstance(layer, _CONVT), groups=getattr(layer, "groups", 1),
    )
    _set_weights(layer, w, b)
    return ""


def _try_next(site: BNSite, bn: nn.Module, model: nn.Module, ranks: dict[str, int]) -> str:
    if site.next is None or not site.next_exclusive:
        return f"output goes to {site.next_op}"
    layer = model.get_submodule(site.next)
    if isinstance(layer, _CONV):
        if not _zero_padding(layer):
            return f"next layer {site.next} is a padded convolution"
    elif isinstance(layer, nn.Linear):
        if ranks.get(site.name) != 2:
            return "BN -> Linear folds only for 2D (N, C) input; pass example_input to prove it"
    else:
        return f"output goes to {site.next_op} ({type(layer).__name__})"
    w, b = fold_bn_next_weights(
        layer.weight, layer.bias, *_bn_tensors(bn), groups=getattr(layer, "groups", 1)
    )
    _set_weights(layer, w, b)
    return ""


def _replace(model: nn.Module, names: list[str], new: nn.Module) -> None:
    for qual in names:
        parent_name, _, attr = qual.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)


def _max_abs_error(a, b) -> float:
    if isinstance(a, Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (tuple, list)):
        return max((_max_abs_error(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, dict):
        return max((_max_abs_error(a[k], b[k]) for k in a), default=0.0)
    return 0.0


def _tolerance(ref) -> float:
    """1000 ulps of the output dtype, relative to the output's magnitude."""
    tensors = [ref] if isinstance(ref, Tensor) else [
        t for t in (ref.values() if isinstance(ref, dict) else ref) if isinstance(t, Tensor)
    ] if isinstance(ref, (tuple, list, dict)) else []
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return float("inf")
    eps = max(torch.finfo(t.dtype).eps for t in tensors)
    scale = max(float(t.abs().max()) for t in tensors)
    return 1000 * eps * (1 + scale)


@torch.no_grad()
def fold(model: nn.Module, example_input=None, *, warn: bool = True) -> nn.Module:
    """Return an evaluation-mode deep copy of ``model`` with every foldable BN folded.

    Each folded BN becomes ``nn.Identity`` and its neighbour gets the merged weights (a layer
    without bias gains one). ``model`` is not modified. The returned module carries a
    :class:`FoldReport` as ``.fold_report``: which BN went where, which could not be folded and
    why, and with ``example_input`` (a tensor, or a tuple of positional inputs) the max abs
    difference between the two models' outputs. Unfolded layers also raise a ``UserWarning``
    unless ``warn=False``.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``model`` (or one of its BN layers) is in training mode, has weights on the
            meta device or an uninitialised lazy module, a BN layer's statistics or affine
            parameters hold NaN/Inf (or a negative variance), a merged weight overflows,
            ``example_input`` has an empty batch, or the model's output on it is not finite.
        RuntimeError: with ``example_input``, the outputs differ by more than 1000 ulps of the
            output dtype relative to the output's magnitude (a bug in fold, never expected).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> fast = fold(net, torch.randn(2, 1, 8, 8))
        >>> fast.fold_report.folded
        [('1', '0', 'into previous')]
    """
    check_module("fold", "model", model)
    check_real_weights("fold", model)
    check_bool("fold", "warn", warn)
    _check_example(example_input)
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fold: model must be in evaluation mode, got {len(training)} module(s) in training "
            f"mode (first: {training[0]!r}); call model.eval() before folding"
        )
    for name, bn in bn_layers(model):
        key, words = _bad_bn(bn) if bn.track_running_stats else ("", "")
        if key:
            raise ValueError(
                f"fold: BN layer {name!r} ({type(bn).__name__}): {key} holds {words}; the "
                "folded weights would not be finite. Recompute the statistics "
                "(bnlab.tools.recalibrate) or fix the checkpoint"
            )
    folded = copy_model(model)
    ranks = {} if example_input is None else _input_ranks(folded, example_input)
    analysis = analyse(folded)
    report = FoldReport(analysis.method, analysis.reason)
    for name, bn in bn_layers(folded):
        site = analysis.sites[name]
        why = _why_not_foldable(bn)
        if not why and site.calls != 1:
            why = (
                f"called {site.calls} times per forward" if site.calls
                else "not called by a traceable forward nor found in an nn.Sequential"
            )
        if why:
            report.not_folded.append((name, why))
            continue
        why_prev = _try_prev(site, bn, folded, ranks)
        if not why_prev:
            report.folded.append((name, site.prev, "into previous"))
        else:
            why_next = _try_next(site, bn, folded, ranks)
            if why_next:
                report.not_folded.append((name, f"{why_prev}; {why_next}"))
                continue
            report.folded.append((name, site.next, "into next"))
        _check_merged(name, report.folded[-1][1], folded.get_submodule(report.folded[-1][1]))
        _replace(folded, analysis.names[id(bn)], nn.Identity().eval())
    if example_input is not None:
        ref = _call(model, example_input)
        if not _all_finite(ref):
            raise ValueError(
                "fold: the model's output on example_input is not finite (NaN/Inf), so the "
                "fold cannot be checked; pass an input the model maps to finite values"
            )
        report.max_abs_error = _max_abs_error(ref, _call(folded, example_input))
        tol = _tolerance(ref)
        if report.max_abs_error > tol:
            raise RuntimeError(
                f"fold: the folded model's outputs differ from the original's by "
                f"{report.max_abs_error:.3g} > tolerance {tol:.3g}; this is a bug in "
                f"bnlab.tools.fold, please report it with the model\n{report.summary()}"
            )
    folded.fold_report = report
    if warn and report.not_folded:
        warnings.warn(
            "fold: " + "; ".join(f"{n}: {w}" for n, w in report.not_folded),
            UserWarning, stacklevel=2,
        )
    return folded


FOLDED_FORMAT = "bnlab.folded.v1"


def example_input(shape: Sequence[int] | None) -> Tensor | None:
    """The seeded example input of ``shape`` that ``bnlab fold`` checks the fold with."""
    if shape is None:
        return None
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def folded_checkpoint(folded: nn.Module, factory: str,
                      example_shape: Sequence[int] | None = None) -> dict:
    """The contents of a ``bnlab.folded.v1`` file for ``folded`` (a :func:`fold` result).

    ``factory`` names the callable that builds the unfolded architecture
    (``package.module:callable`` or ``file.py:callable``); ``example_shape`` is the shape of
    the example input the fold was checked with, if any. Save it with ``torch.save``.
    """
    report = getattr(folded, "fold_report", None)
    if not isinstance(report, FoldReport):
        raise ValueError(f"folded_checkpoint: folded must be a model returned by fold(), got "
                         f"{type(folded).__name__} without a fold_report")
    return {"format": FOLDED_FORMAT, "model": factory,
            "example_shape": None if example_shape is None else list(example_shape),
            "state_dict": folded.state_dict(), "report": report.to_dict()}


def load_folded(path: str | Path, factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild a model from a ``bnlab.folded.v1`` file (written by ``bnlab fold``).

    The architecture comes from ``factory`` or, without it, from the factory named in the
    file; it is folded the same way and then takes the saved weights. Raises ``ValueError``
    when the file is not such a file or the factory's model folds differently.
    """
    from ._factory import build_model

    if factory is not None and not callable(factory):
        raise TypeError(f"load_folded: factory must be None or a callable returning the model, "
                        f"got {type(factory).__name__}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FOLDED_FORMAT:
        raise ValueError(f"{path}: not a {FOLDED_FORMAT} file (write one with `bnlab fold`)")
    model = (factory() if factory is not None else build_model(ckpt["model"])).eval()
    shape = ckpt["example_shape"]
    folded = fold(model, example_input(None if shape is None else tuple(shape)), warn=False)
    saved = [tuple(r) for r in ckpt["report"]["folded"]]
    if folded.fold_report.folded != saved:
        raise ValueError(f"{path}: the factory's model folds differently from the saved one "
                         f"({folded.fold_report.folded} vs {saved}); was the model changed?")
    folded.load_state_dict(ckpt["state_dict"])
    return folded

"""Find the mistakes people make with BN layers, before they cost a training run.

``lint(model, example_input=None, optimizer=None)`` returns a list of :class:`Finding`. Rules
about neighbours ("right before BN") use the :mod:`torch.fx` graph when the model can be traced
and ``nn.Sequential`` order otherwise. Rules about shapes and call counts run one forward pass
with ``example_input``, in evaluation mode and without gradients, with forward hooks; the
model's modes are restored and no statistics change.

=====  ========  ==============================================================================
code   severity  mistake
=====  ========  ==============================================================================
BN000  warning   the forward with ``example_input`` failed (the error is in the message)
BN001  error     one BN instance called at several places (the tutorial's own bug)
BN002  warning   bias in the Conv/Linear right before BN (cancelled by the mean subtraction)
BN003  warning   Dropout right before BN (variance shift between training and evaluation)
BN004  warn/err  training batch too small for stable statistics (error: 1 value per channel)
BN005  warning   momentum >= 0.9 in a PyTorch-convention layer (looks like Keras' convention)
BN006  error     non-finite (or negative-variance) running statistics
BN007  warning   weight decay on BN parameters in the optimizer
BN008  warning   BN layers in mixed train/eval modes
BN009  warning   eps too small for a float16 layer (subnormal; flushed to zero on some hardware)
BN010  warning   BN parameters frozen but running statistics still updating
BN011  warning   (source) a call of torch's ``nn.SyncBatchNorm.convert_sync_batchnorm``, which
                 turns bnlab layers into plain torch SyncBatchNorm and drops their behaviour
BN012  warning   (source) gradient accumulation (several ``backward()`` per optimizer
                 ``step()``) outside a ``bnlab.accumulation`` block
=====  ========  ==============================================================================

BN011 and BN012 cannot be seen in a model: after torch's converter has run, a window-mode or
fused layer is an ordinary ``torch.nn.SyncBatchNorm`` with the same state, and a model does not
know how often its optimizer steps. ``lint_source`` reads Python source (the file a model comes
from, or a training script) for them; ``bnlab lint`` runs both.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from .._checks import check_module, check_real_weights
from ._graph import analyse, bn_layers

__all__ = ["Finding", "lint", "lint_source", "RULES", "MIN_BATCH"]

Severity = Literal["error", "warning"]

#: below this many samples per training batch BN004 warns (Wu & He 2018: ResNet-50 ImageNet
#: error 23.6% at batch 32, 34.7% at batch 2)
MIN_BATCH = 8

#: code -> (why, fix)
RULES: dict[str, tuple[str, str]] = {
    "BN000": ("rules that need shapes or call counts could not run",
              "make the model accept example_input, or fix the error shown"),
    "BN001": ("a shared BN layer mixes the statistics of different inputs in one running "
              "estimate, and fails outright when the channel counts differ",
              "create one BN layer per call site"),
    "BN002": ("BN subtracts the batch mean, which removes any constant the previous layer adds: "
              "the bias is a wasted parameter that only receives noise",
              "construct the previous layer with bias=False"),
    "BN003": ("Dropout scales activations differently in training and evaluation, so the "
              "variance BN learns in training is wrong at test time (Li et al. 2019)",
              "put Dropout after the BN layer (or after the last BN)"),
    "BN004": ("batch statistics from few samples are noisy and differ from the population "
              "statistics used in evaluation",
              "use a larger batch, GroupNorm/LayerNorm, or Batch Renorm"),
    "BN005": ("in PyTorch momentum is the weight of the NEW batch; 0.99 (Keras' default, the "
              "weight of the OLD value) makes the running statistics follow the last batch",
              "use 1 - keras_momentum (bnlab.keras.momentum_from_keras), e.g. 0.01"),
    "BN006": ("evaluation normalises with these statistics: every output becomes NaN/Inf",
              "recompute them with bnlab.tools.recalibrate, or find the batch that produced them"),
    "BN007": ("weight decay pulls gamma towards 0 and beta towards 0, shrinking the layer's "
              "output scale for no regularisation benefit (BN is scale invariant)",
              "put BN weights and biases in a parameter group with weight_decay=0"),
    "BN008": ("some layers normalise with batch statistics and others with running statistics, "
              "usually a forgotten .train()/.eval() on a submodule",
              "call model.train() or model.eval() on the whole model"),
    "BN009": ("eps is added to the variance in float16, where values below 6.1e-05 are "
              "subnormal and may be flushed to zero: a dead channel then divides by zero",
              "keep BN layers in float32 (autocast does) or use eps >= 1e-3"),
    "BN011": ("torch's converter builds a plain torch.nn.SyncBatchNorm from every _BatchNorm, "
              "bnlab's layers included: a window, a fused activation, Batch Renorm or Ghost BN "
              "is silently lost (the state dict still loads)",
              "use bnlab.SyncBatchNorm.convert_sync_batchnorm(model): it converts torch and "
              "bnlab layers and keeps bnlab's behaviour"),
    "BN012": ("under gradient accumulation every micro-batch moves a BN layer's running "
              "statistics as if it were a batch: they follow a k-times smaller batch with "
              "k-times more updates (pytorch/pytorch#46516)",
              "put the k forward/backward passes of one optimizer step inside "
              "`with bnlab.accumulation(model):` (one update from the merged moments)"),
    "BN010": ("a frozen layer (no gradient for gamma/beta) still updates its running statistics "
              "in train mode, so 'frozen' features drift while fine-tuning",
              "call .eval() on frozen BN layers after each model.train()"),
}

_LINEAR_LIKE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.Linear)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class Finding:
    """One lint result. ``module`` is the BN layer's qualified name."""

    code: str
    severity: Severity
    module: str
    message: str
    why: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.module or '<model>'}: {self.code} {self.severity}: {self.message}"


def _finding(code: str, severity: Severity, module: str, message: str) -> Finding:
    why, fix = RULES[code]
    return Finding(code, severity, module, message, why, fix)


def _observe(model: nn.Module, example_input) -> tuple[Counter, dict, str]:
    """Call counts and first input shapes of every BN layer; the forward's error, if any."""
    counts: Counter[str] = Counter()
    shapes: dict[str, tuple[int, ...]] = {}
    modes = {m: m.training for m in model.modules()}
    handles = []

    def hook(name: str):
        def pre(module, args):  # returns None: a pre-hook's return value replaces the input
            counts[name] += 1
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        return pre

    error = ""
    try:
        for name, bn in bn_layers(model):
            handles.append(bn.register_forward_pre_hook(hook(name)))
        model.eval()  # evaluation mode: no running statistics change
        with torch.no_grad():
            if isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    except Exception as exc:  # noqa: BLE001 - reported as BN000, the other rules still run
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return counts, shapes, error


def _decayed(optimizer: torch.optim.Optimizer | None) -> dict[int, float]:
    out: dict[int, float] = {}
    if optimizer is None:
        return out
    for group in optimizer.param_groups:
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        if wd > 0:
            for p in group["params"]:
                out[id(p)] = wd
    return out


def lint(model: nn.Module, example_input=None, optimizer=None) -> list[Finding]:
    """Check ``model`` (and ``optimizer``) for BN mistakes; errors first, then warnings.

    Args:
        model: any module with torch or bnlab BN layers. Not modified.
        example_input: a training batch (tensor, or tuple of positional inputs). Enables the
            call-count (BN001) and batch-size (BN004) rules with forward hooks.
        optimizer: checked for weight decay on BN parameters (BN007).

    Example::

        >>> bn = nn.BatchNorm2d(8)
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.Conv2d(8, 8, 3), bn)
        >>> [(f.code, f.module) for f in lint(net)]
        [('BN001', '1')]
    """
    check_module("lint", "model", model)
    check_real_weights("lint", model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"lint: optimizer must be None or a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    layers = bn_layers(model)
    analysis = analyse(model)
    out: list[Finding] = []
    counts, shapes, error = Counter(), {}, ""
    if example_input is not None:
        counts, shapes, error = _observe(model, example_input)
        if error:
            out.append(_finding("BN000", "warning", "", f"forward with example_input failed: "
                                f"{error}"))
    decayed = _decayed(optimizer)
    modes = Counter(bn.training for _, bn in layers)
    for name, bn in layers:
        site = analysis.sites[name]
        calls = counts.get(name) if example_input is not None else site.calls
        if calls and calls > 1:
            how = "forward hooks" if example_input is not None else analysis.method
            out.append(_finding("BN001", "error", name,
                                f"{type(bn).__name__}({bn.num_features}) is called {calls} "
                                f"times per forward (found with {how})"))
        prev = model.get_submodule(site.prev) if site.prev is not None else None
        if isinstance(prev, _LINEAR_LIKE) and prev.bias is not None:
            out.append(_finding("BN002", "warning", name,
                                f"{site.prev} ({type(prev).__name__}) right before it has a bias"))
        if isinstance(prev, _DROPOUT) or "dropout" in site.prev_op.lower():
            out.append(_finding("BN003", "warning", name,
                                f"Dropout ({site.prev_op}) right before it"))
        if bn.training and name in shapes:
            shape = shapes[name]
            per_channel = int(torch.Size(shape).numel() // shape[1]) if len(shape) > 1 else 0
            if per_channel <= 1:
                out.append(_finding("BN004", "error", name,
                                    f"input {shape} has {per_channel} value per channel: "
                                    "training raises"))
            elif shape[0] < MIN_BATCH:
                out.append(_finding("BN004", "warning", name,
                                    f"training batch of {shape[0]} samples (< {MIN_BATCH})"))
        uses_momentum = getattr(bn, "running", "ema") == "ema"
        if uses_momentum and bn.momentum is not None and bn.momentum >= 0.9:
            out.append(_finding("BN005", "warning", name,
                                f"momentum={bn.momentum} (PyTorch convention: weight of the "
                                "new batch)"))
        if bn.track_running_stats and bn.running_mean is not None:
            finite = bool(torch.isfinite(bn.running_mean).all()
                          and torch.isfinite(bn.running_var).all())
            if not finite or bool((bn.running_var < 0).any()):
                out.append(_finding("BN006", "error", name,
                                    "running_mean/running_var contain NaN, Inf or negative "
                                    "variances"))
        if bn.affine:
            wd = [decayed[id(p)] for p in (bn.weight, bn.bias) if id(p) in decayed]
            if wd:
                out.append(_finding("BN007", "warning", name,
                                    f"weight_decay={max(wd)} applies to its weight/bias"))
        minority = modes[True] < modes[False]  # on a tie the eval-mode layers are flagged
        if len(modes) > 1 and bn.training == minority:
            mode, other = ("train", "eval") if bn.training else ("eval", "train")
            out.append(_finding("BN008", "warning", name,
                                f"in {mode} mode while {modes[not bn.training]} other BN "
                                f"layer(s) are in {other} mode"))
        dtypes = {t.dtype for t in (bn.weight, bn.running_var) if t is not None}
        if torch.float16 in dtypes and bn.eps < torch.finfo(torch.float16).tiny:
            out.append(_finding("BN009", "warning", name,
                                f"eps={bn.eps} is below float16's smallest normal "
                                f"{torch.finfo(torch.float16).tiny:.3g}"))
        if (bn.affine and not bn.weight.requires_grad and not bn.bias.requires_grad
                and bn.training and bn.track_running_stats and bn.momentum != 0):
            out.append(_finding("BN010", "warning", name,
                                "weight and bias are frozen but the layer is in train mode "
                                "and updates its running statistics"))
    return sorted(out, key=lambda f: (f.severity != "error", f.code, f.module))


#: what torch's converter is called by, fully qualified
_TORCH_CONVERTERS = {
    "torch.nn.SyncBatchNorm.convert_sync_batchnorm",
    "torch.nn.modules.batchnorm.SyncBatchNorm.convert_sync_batchnorm",
}


def _qualified(node: ast.expr, names: dict[str, str]) -> str | None:
    """``a.b.c`` with ``a`` replaced by what the source imported it as; None otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return ".".join([names[node.id], *reversed(parts)])


#: what ``bnlab.accumulation`` is called by, fully qualified
_ACCUMULATION = {"bnlab.accumulation", "bnlab.accumulate.accumulation"}


def _scope(node: ast.AST) -> Iterator[tuple[ast.AST, bool, int]]:
    """The nodes inside a loop's body: ``(node, under_if, loop_depth)``, without descending into
    functions or classes defined there (their code runs where they are called)."""
    todo = [(child, False, 0) for child in ast.iter_child_nodes(node)]
    while todo:
        n, cond, depth = todo.pop()
        yield n, cond, depth
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        inner = depth + isinstance(n, (ast.For, ast.AsyncFor, ast.While))
        todo += [(c, cond or isinstance(n, ast.If), inner) for c in ast.iter_child_nodes(n)]


def _method(node: ast.AST, attr: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == attr)


def _receiver(call: ast.Call) -> str:
    return ast.unparse(call.func.value).lower()


def _accumulating(tree: ast.AST, names: dict[str, str]) -> list[ast.Call]:
    """The ``backward()`` calls of loops that call it more than once per optimizer ``step()``
    (BN012), outside ``with bnlab.accumulation(...)`` blocks: a loop whose backward runs every
    iteration but whose every step is under an ``if`` (``if (i + 1) % k == 0: opt.step()``), a
    loop that steps after an inner loop of backward calls, or a loop that divides by a name
    with "accum" in it (``loss / accum_steps``)."""
    covered: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)) and any(
            isinstance(i.context_expr, ast.Call)
            and _qualified(i.context_expr.func, names) in _ACCUMULATION for i in node.items
        ):
            covered |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: dict[int, ast.Call] = {}
    for loop in ast.walk(tree):
        if not isinstance(loop, (ast.For, ast.AsyncFor, ast.While)):
            continue
        nodes = list(_scope(loop))
        backward = [(n, c, d) for n, c, d in nodes
                    if _method(n, "backward") and id(n) not in covered]
        steps = [(n, c, d) for n, c, d in nodes
                 if _method(n, "step") and "sched" not in _receiver(n)]
        if not backward:
            continue
        conditional = bool(steps) and all(c for _, c, _ in steps) and any(
            not c for _, c, _ in backward)
        inner = any(d == 0 for _, _, d in steps) and any(d > 0 for _, _, d in backward) and not (
            any(d > 0 for _, _, d in steps))
        divided = any(
            isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
            and "accum" in ast.unparse(n.right).lower() for n, _, _ in nodes)
        if conditional or inner or divided:
            for n, _, _ in backward:
                found[id(n)] = n
    return list(found.values())


def lint_source(source: str, filename: str = "<source>") -> list[Finding]:
    """Check Python source for BN mistakes a model cannot show (BN011, BN012).

    Reads the source (nothing runs): a call of torch's
    ``SyncBatchNorm.convert_sync_batchnorm``, however it was imported (``torch.nn``, ``nn``,
    ``from torch.nn import SyncBatchNorm``), is reported with its line; bnlab's converter is
    not. BN012 reports each ``backward()`` call of a loop that accumulates gradients (several
    backward calls per optimizer ``step()``: a step under an ``if`` such as
    ``if (i + 1) % k == 0``, a step after an inner loop of backward calls, or a division by
    ``accum_steps``) outside a ``with bnlab.accumulation(model):`` block. The source does not
    say whether the model has BN layers: the warning applies when it does.

    Example::

        >>> src = "from torch import nn\nmodel = nn.SyncBatchNorm.convert_sync_batchnorm(m)\n"
        >>> [(f.code, f.module) for f in lint_source(src, "train.py")]
        [('BN011', 'train.py:2')]
    """
    if not isinstance(source, str):
        raise TypeError(f"lint_source: source must be a str of Python code, got "
                        f"{type(source).__name__}")
    if not isinstance(filename, str):
        raise TypeError(f"lint_source: filename must be a str, got {type(filename).__name__}")
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise ValueError(f"lint_source: {filename} is not valid Python (line {e.lineno}: "
                         f"{e.msg})") from e
    names: dict[str, str] = {}  # local name -> module or object it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    root = a.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            target = _qualified(node.func, names)
            if target in _TORCH_CONVERTERS:
                out.append(_finding("BN011", "warning", f"{filename}:{node.lineno}",
                                    "calls torch.nn.SyncBatchNorm.convert_sync_batchnorm"))
    for call in _accumulating(tree, names):
        out.append(_finding("BN012", "warning", f"{filename}:{call.lineno}",
                            "backward() runs several times per optimizer step (gradient "
                            "accumulation) outside a bnlab.accumulation block"))
    return sorted(out, key=lambda f: (int(f.module.rsplit(":", 1)[1]), f.code))

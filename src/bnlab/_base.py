"""The base class every bnlab normalisation layer derives from, public as ``bnlab.NormBase``.

It owns parameters, buffers, argument checking, ``reset_*``, ``extra_repr``, state-dict
versioning, synchronisation and the running-statistics update, and ``forward`` (which a
variant never overrides). A variant (a user's own included) subclasses it, or a layer built
on it such as ``bnlab.BatchNorm2d`` (which also gives it torch's ``nn.BatchNorm2d`` for
``isinstance`` checks), and overrides the hooks it needs:

* ``_batch_forward(x) -> (y, mean, biased_var, count)`` - how a training batch is normalised
  (Ghost BN splits it, Batch Renorm corrects it);
* ``_eval_forward(x)`` - how running statistics normalise in evaluation;
* ``_activation() -> (act, slope)`` - an activation after the affine map;
* ``eval_is_affine()`` - whether ``fold``/``freeze`` may treat evaluation as an affine map;
* ``_saves_output()`` - whether training keeps only its output (in-place activated BN);
* ``_sync_policy`` (class attribute) - ``"sync"``, ``"local"`` or ``"refuse"`` when a
  ``process_group`` is given.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _state
from . import functional as F
from ._checks import check_bool, check_factory, check_process_group
from ._sync_ops import group_size
from .kernels import backends as _backends
from .kernels.library import snapshot

# (bound once: the traced path of a layer reaches each object by one name, so dynamo adds no
# aliasing checks, which run in Python on every call of a compiled model)
_Proxy = torch.fx.Proxy
_train_step = _backends.train_step

Running = Literal["ema", "cumulative", "window"]
NormalizeWith = Literal["batch", "running"]
NonFinite = Literal["skip", "raise"]


#: The most bytes the two ring buffers of ``running="window"`` may take (``2 * window_size *
#: num_features * element size``). A larger window is refused when the layer is built instead
#: of allocating until the process is killed; raise it here if you really need more.
WINDOW_BYTES_LIMIT = 1 << 30


_SYNC_REFUSALS = {
    "local": "its statistics are per process by design (leave it local)",
    "refuse": "use a BatchNorm layer where statistics must be synchronised",
}


class NonFiniteStatisticsError(FloatingPointError):
    """A training batch produced NaN/Inf statistics and ``nonfinite="raise"`` was set."""


#: What each rank of torch's BN accepts, read by every bnlab layer that subclasses it.
RANK_INPUTS: dict[type[nn.Module], tuple[tuple[int, ...], str]] = {
    nn.BatchNorm1d: ((2, 3), "(N, C) or (N, C, L)"),
    nn.BatchNorm2d: ((4,), "(N, C, H, W)"),
    nn.BatchNorm3d: ((5,), "(N, C, D, H, W)"),
}


def _forwarding_signature(own: Any, base: Any) -> inspect.Signature:
    """The signature of an ``__init__`` that forwards ``*args``/``**kwargs`` to ``base``: its
    own parameters with ``base``'s spelt out in place of the ``*args`` and ``**kwargs``, so
    ``inspect.signature`` and ``help`` show every argument a layer accepts."""
    mine = inspect.signature(own)
    kinds = {p.kind for p in mine.parameters.values()}
    named = [p for p in mine.parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
    names = {p.name for p in named}
    inherited = [p for p in inspect.signature(base).parameters.values() if p.name not in names]
    positional = [p for p in named if p.kind is not p.KEYWORD_ONLY]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        positional += [p for p in inherited if p.kind is p.POSITIONAL_OR_KEYWORD]
    keyword = [p for p in named if p.kind is p.KEYWORD_ONLY]
    if inspect.Parameter.VAR_KEYWORD in kinds:
        keyword += [p for p in inherited if p.kind is p.KEYWORD_ONLY]
    return mine.replace(parameters=positional + keyword)


def _check_choice(owner: str, name: str, value: Any, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(
            f"{owner}: {name} must be one of {sorted(choices)}, got {value!r}"
        )


class _NormBase(_BatchNorm):
    """Parameters, buffers and the statistics update shared by bnlab's BN layers.

    A subclass of torch's ``_BatchNorm``, so every tool that finds BN layers with
    ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` (``swa_utils.update_bn``,
    ``torch.func.replace_all_batch_norm_modules_``, FSDP mixed precision, timm, Lightning,
    fvcore) sees bnlab layers; bnlab owns the constructor, the buffers and ``forward``.
    """

    _version = 2  # same as torch's _NormBase: version 2 added num_batches_tracked
    #: accepted input ranks and their description: from the torch class a layer subclasses
    #: (:data:`RANK_INPUTS`), or set by the layer
    _input_dims: tuple[int, ...] = ()
    _input_layout: str = ""
    #: why the layer needs ``track_running_stats=True``, for one that does (else ``None``)
    _needs_running_stats: str | None = None
    #: synchronise even without a ``process_group`` (``None``: the default group)
    _always_sync = False

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        running: Running = "ema",
        window_size: int | None = None,
        normalize_with: NormalizeWith = "batch",
        nonfinite: NonFinite = "skip",
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not _BatchNorm's: bnlab builds its own parameters
        name = type(self).__name__
        for flag, value in (("affine", affine), ("track_running_stats", track_running_stats),
                            ("bias", bias)):
            check_bool(name, flag, value)
        check_factory(name, device, dtype)
        check_process_group(name, process_group)
        if self._needs_running_stats and not track_running_stats:
            raise ValueError(
                f"{name}: {self._needs_running_stats} and needs track_running_stats=True, "
                "got track_running_stats=False"
            )
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"{name}: num_features must be a positive int, got {num_features!r}"
            )
        if isinstance(eps, bool) or not (
            isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)
        ):
            raise ValueError(f"{name}: eps must be a positive finite float, got {eps!r}")
        if momentum is not None and (isinstance(momentum, bool) or not (
            isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0
        )):
            raise ValueError(
                f"{name}: momentum must be a float in [0, 1] or None (cumulative average), "
                f"got {momentum!r}; for a Keras momentum m use bnlab.keras.momentum_from_keras(m)"
            )
        _check_choice(name, "running", running, Running)
        _check_choice(name, "normalize_with", normalize_with, NormalizeWith)
        _check_choice(name, "nonfinite", nonfinite, NonFinite)
        if running == "window":
            if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
                raise ValueError(
                    f"{name}: running='window' needs window_size, a positive int, "
                    f"got window_size={window_size!r}"
                )
            itemsize = torch.empty(0, dtype=dtype).element_size()
            need = 2 * window_size * num_features * itemsize
            if need > WINDOW_BYTES_LIMIT:
                raise ValueError(
                    f"{name}: window_size={window_size} needs {need:,} bytes "
                    f"(2 x {window_size} x {num_features} channels x {itemsize} bytes for "
                    f"window_mean and window_var), over the limit of {WINDOW_BYTES_LIMIT:,} "
                    "bytes (bnlab._base.WINDOW_BYTES_LIMIT); use a smaller window_size"
                )
        elif window_size is not None:
            raise ValueError(
                f"{name}: window_size={window_size!r} is only used with running='window', "
                f"got running={running!r}"
            )
        if normalize_with == "running" and not track_running_stats:
            raise ValueError(
                f"{name}: normalize_with='running' needs running statistics, "
                "got track_running_stats=False"
            )
        own_batches = type(self)._batch_forward is not _NormBase._batch_forward
        if normalize_with == "running" and own_batches:
            raise ValueError(
                f"{name}: normalises its training batches its own way, so "
                "normalize_with='running' does not apply; use normalize_with='batch'"
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.running = running
        self.window_size = window_size
        self.normalize_with = normalize_with
        self.nonfinite = nonfinite
        self._warned_nonfinite = False
        # Synchronised statistics: any layer given a process group (and every SyncBatchNorm,
        # whose None means the default group) reduces its batch statistics over the ranks.
        sync = process_group is not None or self._always_sync
        if sync and getattr(type(self), "_sync_policy", "sync") != "sync":
            raise ValueError(
                f"{name}: cannot synchronise its statistics (process_group given); "
                f"{_SYNC_REFUSALS.get(type(self)._sync_policy, '')}"
            )
        if sync and normalize_with == "running":
            raise ValueError(f"{name}: normalize_with='running' cannot be synchronised; "
                             "use normalize_with='batch'")
        self.process_group = process_group
        self.sync = sync
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
            if running == "window":
                self.register_buffer(
                    "window_mean", torch.zeros(window_size, num_features, **factory)
                )
                self.register_buffer(
                    "window_var", torch.ones(window_size, num_features, **factory)
                )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    #: plain BN batches (``_batch_forward`` not overridden): the kernels' step applies
    _plain_batches = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_batches = cls._batch_forward is _NormBase._batch_forward
        if "_input_dims" not in cls.__dict__:
            for torch_cls, (dims, layout) in RANK_INPUTS.items():
                if issubclass(cls, torch_cls):
                    cls._input_dims, cls._input_layout = dims, layout
                    break
        init = cls.__dict__.get("__init__")
        if init is not None:
            # a variant takes its own keyword-only arguments and forwards the rest
            init.__signature__ = _forwarding_signature(init, super(cls, cls).__init__)

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Zero the means, set the variances to one and forget every tracked batch."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
            if self.running == "window":
                self.window_mean.zero_()
                self.window_var.fill_(1)

    def reset_parameters(self) -> None:
        """Reset running statistics, ``weight`` to one and ``bias`` to zero."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.running != "ema":
            s += f", running={self.running!r}"
        if self.window_size is not None:
            s += f", window_size={self.window_size}"
        if self.normalize_with != "batch":
            s += f", normalize_with={self.normalize_with!r}"
        return s

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version", None)
        # Checkpoints written before num_batches_tracked existed (torch < 0.4.1) lack it.
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        # Checked before anything is copied: a refused state dict leaves the layer as it was.
        _state.check_statistics(self, state_dict, prefix)
        window = self.track_running_stats and self.running == "window"
        missing = _state.missing_window(self, state_dict, prefix, strict) if window else []
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        _state.start_window(self, missing)  # never zero slots counted as batches

    # ------------------------------------------------------------------ input
    def _check_input(self, x: Tensor) -> None:
        # (the layer's name only for a message: read on every call, traced, it costs an
        # aliasing check per pair of layers of one class on every call of the graph)
        if isinstance(x, _Proxy):
            return  # symbolic_trace: the shape is unknown until the graph runs
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor input, got "
                            f"{type(x).__name__}")  # fmt: skip
        if x.dim() not in self._input_dims:
            ranks = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(
                f"{type(self).__name__}: expected {ranks} input {self._input_layout}, "
                f"got {x.dim()}D input of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_features} channels in dim 1 "
                f"(num_features={self.num_features}), got input of shape {tuple(x.shape)}"
            )
        if not (x.is_floating_point()):
            raise TypeError(f"{type(self).__name__}: expected a floating-point input, got "
                            f"dtype {x.dtype}")  # fmt: skip

    def _syncing(self) -> bool:
        """Whether this forward reduces its statistics over the ranks of ``process_group``."""
        return (
            self.sync
            and (self.training or not self.track_running_stats)
            and group_size(self.process_group) > 1
        )

    def _check_batch_size(self, x: Tensor) -> None:
        """One value per channel cannot be normalised (a synchronising layer checks the global
        count instead, on every rank alike)."""
        if F.count_per_channel(x) == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {x.size()}"
            )

    # ------------------------------------------------------------------ hooks
    def _activation(self) -> tuple[str, float]:
        """``(act, negative_slope)`` applied after the affine map; ``("identity", 0.0)`` here."""
        return ("identity", 0.0)

    def _saves_output(self) -> bool:
        """Whether training keeps only the layer's output for backward (in-place activated BN,
        :mod:`bnlab.kernels.inplace`); ``False`` here."""
        return False

    def eval_is_affine(self) -> bool:
        """Whether this layer in evaluation is exactly the per-channel affine map of its running
        statistics, ``weight`` and ``bias`` (what :func:`bnlab.tools.fold` folds). A variant
        whose evaluation differs overrides this and returns ``False``."""
        return self.track_running_stats and self._activation()[0] == "identity"

    def _batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """Normalise a training batch. Returns ``(y, mean, biased_var, count)``.

        ``mean``/``biased_var`` are the batch statistics that update the running estimate and
        ``count`` the number of values per channel they were computed over.
        """
        act, slope = self._activation()
        if self.sync and self._syncing():
            return _backends.train_synced(x, self.weight, self.bias, self.eps, act, slope,
                                          self.process_group, inplace=self._saves_output())
        n = F.count_per_channel(x)
        if self.normalize_with == "running":
            if _can_read(self.num_batches_tracked, False) and not _kernels_capturing(x):
                if int(self.num_batches_tracked) > 0:
                    # eager, from the second batch on: the running statistics, on the fast
                    # (native) evaluation path; the first batch uses its own (below)
                    with torch.no_grad():
                        mean, var = F.batch_stats(x)
                    # copies: torch's kernel saves them for backward, and they are updated in
                    # place before that runs
                    rm, rv = self.running_mean.clone(), self.running_var.clone()
                    y = _backends.evaluate(x, rm, rv, self.weight, self.bias, self.eps, act,
                                           slope)  # fmt: skip
                    return y, mean, var, n
            else:
                # In graphs: the running statistics (no gradient) from the second batch on,
                # the batch's own before, chosen with torch.where: one graph for every step.
                mean, var = F.batch_stats(x)
                # (snapshots: the buffers are updated in place after this; library.snapshot)
                seen = self.num_batches_tracked > 0
                m = torch.where(seen, snapshot(self.running_mean).to(mean.dtype), mean)
                v = torch.where(seen, snapshot(self.running_var).to(var.dtype), var)
                y = F.normalize_act(x, m, v, self.weight, self.bias, self.eps, act, slope)
                return y, mean, var, n
        # (the registry directly: eps was checked when the layer was built)
        fn = _backends.train_inplace if self._saves_output() else _backends.train
        y, mean, var = fn(x, self.weight, self.bias, self.eps, act, slope)
        return y, mean, var, n

    def _eval_forward(self, x: Tensor) -> Tensor:
        """Normalise with the running statistics."""
        w, b, rm, rv, _ = self._step_tensors()
        return _backends.evaluate(x, rm, rv, w, b, self.eps, *self._activation())

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training and self.track_running_stats:
            return self._eval_forward(x)
        if isinstance(x, _Proxy):
            raise NotImplementedError(
                f"{type(self).__name__}: torch.fx.symbolic_trace records evaluation-mode bnlab "
                "layers only (their running statistics are updated outside the graph torch.fx "
                "can express); call model.eval() before tracing, or use torch.compile / "
                "torch.export for training"
            )
        syncing = self.sync and self._syncing()
        if not syncing:
            self._check_batch_size(x)
            if x.numel() == 0:
                # Nothing to normalise and nothing to learn from: keep the statistics as they
                # are (a synchronising rank goes on: it must still join the collectives).
                return self._eval_forward(x) if self.track_running_stats else x.clone()
        if not (self.training and self.track_running_stats):
            return self._batch_forward(x)[0]
        if not syncing and self._plain_batches and self.running != "window" and (
            self.normalize_with == "batch"
        ):
            y = self._step(x)
            if y is not None:
                return y
        y, mean, var, count = self._batch_forward(x)
        self._update_running(mean.detach(), var.detach(), count)
        return y

    def _step(self, x: Tensor) -> Tensor | None:
        """A plain layer's training step: statistics, output and the running update in one call
        of the kernels (:func:`bnlab.kernels.backends.train_step`), or ``None`` when the chosen
        backend has none (then :meth:`_batch_forward` and :meth:`_update_running` run, with the
        same results)."""
        momentum = None if self.running == "cumulative" else self.momentum
        act, slope = self._activation()
        w, b, rm, rv, seen = self._step_tensors()
        out = _train_step(x, w, b, rm, rv, seen, momentum, self.eps, act, slope,
                          inplace=self._saves_output())  # fmt: skip
        if out is None:
            return None
        if out[1] is False:
            self._skip_nonfinite()
        return out[0]

    def _step_tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, Tensor]:
        """``(weight, bias, running_mean, running_var, num_batches_tracked)``, read from the
        module's own dicts where they live there (``nn.Module.__getattr__`` costs about 0.4 us
        a name, a fifth of a small layer's whole Python path); anything else (a frozen
        layer's weight held as a buffer, a subclass's property) through the attributes."""
        p, b = self._parameters, self._buffers
        try:
            return (p["weight"], p["bias"], b["running_mean"], b["running_var"],
                    b["num_batches_tracked"])  # fmt: skip
        except KeyError:
            pass
        return (self.weight, self.bias, self.running_mean, self.running_var,
                self.num_batches_tracked)  # fmt: skip

    def _skip_nonfinite(self) -> None:
        """A batch with NaN/Inf statistics was kept out: warn once, or raise."""
        msg = (
            f"{type(self).__name__}: a training batch produced non-finite statistics "
            "(NaN or Inf in the input); the running statistics were not updated"
        )
        if self.nonfinite == "raise":
            raise NonFiniteStatisticsError(msg)
        if not self._warned_nonfinite:
            warnings.warn(msg + " (warned once per layer)", RuntimeWarning, stacklevel=4)
            self._warned_nonfinite = True

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Move the running statistics towards a batch's ``mean`` and biased ``var``.

        Tensor ops only (:func:`bnlab.functional.running_update`): a batch with NaN/Inf
        statistics leaves every buffer as it was, without a branch on a tensor's value. Only
        where reading one flag costs nothing (eager, CPU, outside ``torch.func`` transforms)
        does the layer also warn once, or raise with ``nonfinite="raise"``; on other devices
        and inside graphs the batch is skipped silently, unless ``nonfinite="raise"`` asks for
        the check (a device sync in eager).
        """
        window = (self.window_mean, self.window_var) if self.running == "window" else None
        rm, rv, seen, window, finite = F.running_update(
            self.running_mean, self.running_var, self.num_batches_tracked, mean, var, count,
            self.momentum, running=self.running, window=window,
        )  # fmt: skip
        self.running_mean.copy_(rm)
        self.running_var.copy_(rv)
        self.num_batches_tracked.copy_(seen)
        if window is not None:
            self.window_mean.copy_(window[0])
            self.window_var.copy_(window[1])
        if _can_read(finite, self.nonfinite == "raise") and not bool(finite):
            self._skip_nonfinite()


def _kernels_capturing(x: Tensor) -> bool:
    """Inside a graph (compile, export), an FX trace or a torch.func transform."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or isinstance(x, torch.fx.Proxy)
        or torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def _can_read(flag: Tensor, forced: bool) -> bool:
    """Whether the layer may read ``flag``'s value (a Python branch) without breaking a graph,
    a ``torch.func`` transform or, unless ``forced``, a GPU's asynchrony."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(flag):
        return False
    return forced or flag.is_cpu


#: The documented base class for bnlab layers and users' own variants (see the module text).
NormBase = _NormBase

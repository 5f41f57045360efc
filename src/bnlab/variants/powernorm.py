"""Power Normalization (Shen et al., ICML 2020): a running quadratic mean instead of BN's batch
mean and variance, and an approximate backward that makes it trainable."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import _state
from .. import functional as F
from .._base import NonFiniteStatisticsError, _can_read, _check_choice, _kernels_capturing
from .._checks import check_bool, check_factory
from .masked import valid_mask

__all__ = ["PowerNorm"]

Layout = Literal["ncl", "nlc"]
NonFinite = Literal["skip", "raise"]


# ---------------------------------------------------------------------------- functional core
def group_scale(x: Tensor, mask: Tensor | None, group_num: int, eps: float) -> Tensor:
    """Divide each position of ``x`` ``(N, C, L)`` by the root mean square of its channel
    group (``group_num`` groups of ``C / group_num`` channels), in the compute dtype. Padded
    positions (``mask`` false) become 0 first, so their NaN/Inf never reach a gradient."""
    xc = x.to(F.compute_dtype(x.dtype))
    if mask is not None:
        xc = torch.where(mask[:, None, :], xc, 0.0)
    n, c, length = xc.shape
    xg = xc.reshape(n, group_num, c // group_num, length)
    m2 = (xg * xg).mean(dim=2, keepdim=True)
    return (xg * torch.rsqrt(m2 + eps)).reshape(n, c, length)


def quadratic_mean(xs: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | int]:
    """Per-channel mean of ``xs**2`` over the valid positions (``mask`` ``(N, L)`` true, or all
    of them), and their count. Padded entries of ``xs`` must be 0 (:func:`group_scale`)."""
    count: Tensor | int = xs.shape[0] * xs.shape[2] if mask is None else mask.sum()
    denom = count.clamp_min(1).to(xs.dtype) if isinstance(count, Tensor) else max(count, 1)
    return (xs * xs).sum(dim=(0, 2)) / denom, count


def running_phi_update(
    running_phi: Tensor,
    num_batches_tracked: Tensor,
    psi2: Tensor,
    count: Tensor | int,
    alpha_fwd: float,
    warmup_iters: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the running quadratic mean, as tensor ops only (no branch on a value).

    With ``t = num_batches_tracked + 1``: ``phi' = phi (t-1)/t + psi2 / t`` while
    ``t < warmup_iters`` (else ``phi' = phi``), then ``phi = alpha_fwd phi' + (1 - alpha_fwd)
    psi2``. Returns ``(running_phi, num_batches_tracked, finite)``, new tensors: a batch with
    NaN/Inf statistics or no valid position leaves both as they were (``finite`` false)."""
    finite = torch.isfinite(psi2).all() & (torch.as_tensor(count) > 0)
    t = num_batches_tracked + 1
    tf = t.to(psi2.dtype)
    phi = running_phi.to(psi2.dtype)
    phi = torch.where(t < warmup_iters, phi * (tf - 1) / tf + psi2 / tf, phi)
    phi = alpha_fwd * phi + (1 - alpha_fwd) * psi2
    new_phi = torch.where(finite, phi.to(running_phi.dtype), running_phi)
    return new_phi, torch.where(finite, t, num_batches_tracked), finite


def scale_shift(xs: Tensor, mask: Tensor | None, s: Tensor, weight: Tensor | None,
                bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, z, r)``: ``z = xs * r`` with ``r = 1 / sqrt(s + eps)`` (``s`` ``(C,)``) and
    ``y = weight * z + bias``, 0 at padded positions; in ``xs``'s dtype."""
    r = torch.rsqrt(s.to(xs.dtype) + eps)[None, :, None]
    z = xs * r
    y = z if weight is None else z * weight.to(xs.dtype)[None, :, None]
    if bias is not None:
        y = y + bias.to(xs.dtype)[None, :, None]
    if mask is not None:
        y = torch.where(mask[:, None, :], y, 0.0)
    return y, z, r


class _PowerFunction(torch.autograd.Function):
    """``y = weight * xs / sqrt(s + eps) + bias`` (0 at padded positions) with the paper's
    approximate backward; the backward also moves ``ema_gz`` (in place: it needs the
    gradient, which only the backward has)."""

    @staticmethod
    def forward(ctx: Any, xs: Tensor, mask: Tensor | None, s: Tensor, weight: Tensor | None,
                bias: Tensor | None, ema_gz: Tensor, count: Tensor | int, eps: float,
                alpha_bkw: float) -> Tensor:  # fmt: skip
        y, z, r = scale_shift(xs, mask, s, weight, bias, eps)
        ctx.save_for_backward(z, r, weight, mask)
        # the buffer itself, read when the backward runs (not a saved version of it)
        ctx.ema_gz, ctx.count, ctx.alpha_bkw = ema_gz, count, alpha_bkw
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        z, r, weight, mask = ctx.saved_tensors
        if mask is not None:
            gy = torch.where(mask[:, None, :], gy, 0.0)
        g = gy if weight is None else gy * weight.to(gy.dtype)[None, :, None]
        ema = ctx.ema_gz
        gt = g - (1 - ctx.alpha_bkw) * ema.to(g.dtype)[None, :, None] * z
        count = ctx.count
        denom = count.clamp_min(1).to(g.dtype) if isinstance(count, Tensor) else max(count, 1)
        new = ema.to(g.dtype) + (gt * z).sum(dim=(0, 2)) / denom
        with torch.no_grad():
            ema.copy_(torch.where(torch.isfinite(new).all(), new.to(ema.dtype), ema))
        gw = (gy * z).sum(dim=(0, 2)) if ctx.needs_input_grad[3] else None
        gb = gy.sum(dim=(0, 2)) if ctx.needs_input_grad[4] else None
        return gt * r, None, None, gw, gb, None, None, None, None


def power_norm(xs: Tensor, mask: Tensor | None, s: Tensor, weight: Tensor | None,
               bias: Tensor | None, ema_gz: Tensor, count: Tensor | int, eps: float,
               alpha_bkw: float) -> Tensor:  # fmt: skip
    """Normalise the group-scaled ``xs`` ``(N, C, L)`` by ``sqrt(s + eps)`` (``s`` ``(C,)``, a
    constant for back-propagation), with the approximate backward (``ema_gz`` moves in it)."""
    return _PowerFunction.apply(xs, mask, s.detach(), weight, bias, ema_gz, count, eps,
                                alpha_bkw)  # fmt: skip


# ---------------------------------------------------------------------------- module
_DOC = r"""Power Normalization of a batch of sequences (or of vectors).

Paper: Shen, Yao, Gholami, Mahoney, Keutzer, *PowerNorm: Rethinking Batch Normalization in
Transformers*, ICML 2020 (Algorithm 1), and the authors' code (``sIncerass/powernorm``,
``fairseq/modules/norms/mask_powernorm.py``), read and re-derived here, not copied.

Per channel, without mean subtraction, for the valid positions :math:`V` (``mask`` true, or
every position), with :math:`t` = ``num_batches_tracked + 1`` the index of this training
batch and :math:`W` = ``warmup_iters``:

.. math::

    \tilde x_{n,c,l} = \frac{x_{n,c,l}}{\sqrt{\frac{G}{C}\sum_{c' \in g(c)}
        x_{n,c',l}^2 + \epsilon}} \quad \text{(group scaling, } G =
        \text{group\_num)}

    \psi_B^2 = \frac{1}{|V|} \sum_{(n,l) \in V} \tilde x_{n,:,l}^2, \qquad
    s = \begin{cases} \psi_B^2 & t \le W \\ \phi_{t-1} & t > W \end{cases}, \qquad
    z = \frac{\tilde x}{\sqrt{s + \epsilon}}, \qquad y = \gamma z + \beta

    \phi_t = \alpha_f \phi' + (1 - \alpha_f) \psi_B^2, \qquad
    \phi' = \begin{cases} \phi_{t-1} \frac{t-1}{t} + \frac{\psi_B^2}{t} & t < W
        \\ \phi_{t-1} & t \ge W \end{cases}

and the approximate backward (:math:`s` is a constant; :math:`u` is ``ema_gz``):

.. math::

    \hat g = \gamma \frac{\partial L}{\partial y}, \qquad
    \tilde g = \hat g - (1 - \alpha_b)\, u\, z, \qquad
    \frac{\partial L}{\partial \tilde x} = \frac{\tilde g}{\sqrt{s + \epsilon}},
    \qquad u \leftarrow u + \frac{1}{|V|} \sum_{V} \tilde g\, z

with exact :math:`\partial L / \partial \gamma = \sum_V \partial L/\partial y\, z`,
:math:`\partial L / \partial \beta = \sum_V \partial L/\partial y`, and the group scaling
differentiated exactly. This is Algorithm 1 with :math:`\nu = (1 - \alpha_b) u`
(:math:`\tilde g = \hat g - \nu z`, :math:`\nu_t = \nu_{t-1}(1 - (1-\alpha_b)\Gamma) +
(1-\alpha_b)\Lambda`, :math:`\Gamma = \overline{z^2}`, :math:`\Lambda = \overline{\hat g
z}`); ``ema_gz`` keeps the authors' scaling :math:`u`. Evaluation normalises with the
running quadratic mean: :math:`y = \gamma \tilde x / \sqrt{\phi + \epsilon} + \beta`.
Padded positions give exactly 0 and get zero gradient. All symbols but :math:`x, \tilde x,
z, y` are ``(C,)``; :math:`\phi` is ``running_phi``.

Args:
    num_features: ``C``, the number of channels.
    eps: added to the quadratic means (and in the group scaling). Default: ``1e-5``.
    alpha_fwd: :math:`\alpha_f` in ``[0, 1]``, the running quadratic mean's weight of the old
        value. Default: ``0.9``.
    alpha_bkw: :math:`\alpha_b` in ``[0, 1]``, the backward correction's. Default: ``0.9``.
    affine: learn ``weight`` (:math:`\gamma`) and ``bias`` (:math:`\beta`). Default: ``True``.
    warmup_iters: :math:`W \ge 0`, training batches normalised with their own quadratic mean.
        Default: ``10000``.
    group_num: :math:`G`, groups of the group scaling; must divide ``num_features``.
        Default: ``1``.
    layout: ``"ncl"`` for ``(N, C, L)`` inputs, ``"nlc"`` for ``(N, L, C)`` (keyword-only).
        Default: ``"ncl"``.
    nonfinite: ``"skip"`` (warn once) or ``"raise"`` (:class:`bnlab.NonFiniteStatisticsError`)
        when a training batch's statistics are NaN/Inf, as in :class:`bnlab.BatchNorm1d`
        (keyword-only). Default: ``"skip"``.
    device, dtype: factory arguments for the parameters and buffers.

Shape:
    - Input: ``(N, C)`` or ``(N, C, L)`` (``layout="nlc"``: ``(N, L, C)``).
    - ``mask``: boolean ``(N, L)``, true at valid positions; or ``lengths``: integer ``(N,)``
      in ``[0, L]``; as in :class:`bnlab.MaskedBatchNorm1d` (3D inputs only).
    - Output: same shape and dtype as the input.

Buffers: ``running_phi`` ``(C,)`` (:math:`\phi`, starts at 1), ``ema_gz`` ``(C,)`` (:math:`u`,
starts at 0), ``num_batches_tracked`` (0-dim int64): a state dict resumes exactly, across the
warm-up boundary too.

Example::

    >>> import torch, bnlab
    >>> pn = bnlab.PowerNorm(8, warmup_iters=100, layout="nlc")
    >>> x = torch.randn(4, 10, 8, requires_grad=True)
    >>> y = pn(x, lengths=torch.tensor([10, 7, 3, 1]))
    >>> y.backward(torch.randn_like(y))
    >>> bool((y[3, 1:] == 0).all()), int(pn.num_batches_tracked)
    (True, 1)

Notes:
    From the authors' code rather than Algorithm 1: the warm-up (batch statistics normalise
    the first :math:`W` training batches; the cumulative-then-EMA update of :math:`\phi` while
    :math:`t < W`), the group scaling (not in the paper) and the defaults (``MaskPowerNorm``'s:
    ``alpha_fwd = alpha_bkw = 0.9``, ``warmup_iters = 10000``, ``group_num = 1``, ``eps =
    1e-5``). Their transformers pass ``group_num`` = the number of attention heads and
    ``warmup_iters`` = the learning-rate warm-up (fairseq's ``--warmup-updates``).

    Where it deliberately differs from the authors' code:

    - the backward divides by :math:`\sqrt{s + \epsilon}`, the forward's normaliser (the
      paper's :math:`\psi_{t-1}`); the authors' code divides by the batch's
      :math:`\sqrt{\psi_B^2 + \epsilon}` even after the warm-up;
    - with a mask every mean (:math:`\psi_B^2` and the ``ema_gz`` update) is over the valid
      positions only and padded outputs are 0; the authors' code normalises the padded
      positions too and counts them in the backward's means;
    - the group scaling uses the layer's ``eps`` (the authors': a fixed ``1e-5``);
    - a batch with NaN/Inf statistics (or, inside a graph, no valid position) leaves
      ``running_phi`` and ``num_batches_tracked`` as they were, and a NaN/Inf gradient leaves
      ``ema_gz`` as it was (the authors' buffers absorb them);
    - buffers are ``(C,)`` (the authors': ``(1, C, 1, 1)``), the counter is a 0-dim
      ``num_batches_tracked`` (the authors': ``iters``), the mask is true at *valid*
      positions (fairseq's ``pad_mask`` is true at padding), and inputs are ``(N, C, L)`` or
      ``(N, L, C)`` (fairseq's ``(T, B, C)``).

    ``alpha_fwd``/``alpha_bkw`` are, as in the paper, the weight of the *old* value (0.9 is
    torch's momentum 0.1). Every training forward counts one batch (a layer called twice per
    step counts two, as the authors' does); ``ema_gz`` moves in the backward only, so a
    training forward under ``torch.no_grad`` moves ``running_phi`` alone.

    Not a ``torch.nn.modules.batchnorm._BatchNorm`` (nor a bnlab ``NormBase``): it has no mean,
    no variance and an evaluation that is not a per-channel affine map (the group scaling), so
    BN tools (fold, freeze, recalibrate, convert_sync_batchnorm) rightly leave it alone. Every
    step is tensor ops, so ``torch.compile(fullgraph=True)`` makes one graph for every step
    (before and after the warm-up) and every mask of a shape; the checks that read values
    (``lengths`` in ``[0, L]``, a valid position in a training batch, the NaN/Inf warning) run
    in eager mode only.
"""


def _check_unit(name: str, arg: str, value: Any) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{name}: {arg} must be a float in [0, 1] (the old value's weight, "
                         f"as in the paper), got {value!r}")  # fmt: skip


class PowerNorm(nn.Module):
    __doc__ = _DOC

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        affine: bool = True,
        warmup_iters: int = 10000,
        group_num: int = 1,
        *,
        layout: Layout = "ncl",
        nonfinite: NonFinite = "skip",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not (
            isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)
        ):
            raise ValueError(f"{name}: eps must be a positive finite float, got {eps!r}")
        _check_unit(name, "alpha_fwd", alpha_fwd)
        _check_unit(name, "alpha_bkw", alpha_bkw)
        check_bool(name, "affine", affine)
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(
                f"{name}: warmup_iters must be an int >= 0 (training batches normalised with "
                f"their own statistics), got {warmup_iters!r}"
            )
        if isinstance(group_num, bool) or not isinstance(group_num, int) or group_num < 1 \
                or num_features % group_num:  # fmt: skip
            raise ValueError(f"{name}: group_num must be a positive int dividing "
                             f"num_features={num_features}, got {group_num!r}")  # fmt: skip
        _check_choice(name, "layout", layout, Layout)
        _check_choice(name, "nonfinite", nonfinite, NonFinite)
        check_factory(name, device, dtype)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = num_features, float(eps), affine
        self.alpha_fwd, self.alpha_bkw = float(alpha_fwd), float(alpha_bkw)
        self.warmup_iters, self.group_num = warmup_iters, group_num
        self.layout, self.nonfinite = layout, nonfinite
        self._warned_nonfinite = False
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_phi", torch.ones(num_features, **factory))
        self.register_buffer("ema_gz", torch.zeros(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long,
                                                                 device=device))  # fmt: skip
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """``running_phi`` to 1, ``ema_gz`` to 0, and forget every tracked batch (warm-up
        starts again)."""
        self.running_phi.fill_(1)
        self.ema_gz.zero_()
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, ``weight`` to one and ``bias`` to zero."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
             f"alpha_bkw={self.alpha_bkw}, affine={self.affine}, "
             f"warmup_iters={self.warmup_iters}, group_num={self.group_num}, "
             f"layout={self.layout!r}")  # fmt: skip
        return s + (f", nonfinite={self.nonfinite!r}" if self.nonfinite != "skip" else "")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any) -> None:  # fmt: skip
        # checked before anything is copied: a refused state dict leaves the layer as it was
        _state.check_statistics(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        self._check_input(x)
        nlc = self.layout == "nlc" and x.dim() == 3
        xc = x.transpose(1, 2) if nlc else (x[:, :, None] if x.dim() == 2 else x)
        valid = None
        if mask is not None or lengths is not None:
            valid = valid_mask(type(self).__name__, x if x.dim() == 2 else xc, mask, lengths,
                               self._layout_text())  # fmt: skip
        y = self._normalise(xc, valid).to(x.dtype)
        return y.transpose(1, 2) if nlc else (y[:, :, 0] if x.dim() == 2 else y)

    def _normalise(self, x: Tensor, mask: Tensor | None) -> Tensor:
        xs = group_scale(x, mask, self.group_num, self.eps)
        if not self.training:
            # the running quadratic mean: a constant, so autograd's gradient is exact
            return scale_shift(xs, mask, self.running_phi, self.weight, self.bias, self.eps)[0]
        if mask is None and x.numel() == 0:
            return xs.clone()  # nothing to normalise or learn from: the state stays as it is
        psi2, count = quadratic_mean(xs, mask)
        if mask is not None and not _kernels_capturing(x) and int(count) < 1:
            raise ValueError(
                f"{type(self).__name__}: a training batch needs at least 1 valid position, got "
                f"0 in mask of shape {tuple(mask.shape)}; drop the empty batch or evaluate it"
            )
        warm = self.num_batches_tracked + 1 <= self.warmup_iters
        s = torch.where(warm, psi2, self.running_phi.to(psi2.dtype))
        y = power_norm(xs, mask, s, self.weight, self.bias, self.ema_gz, count, self.eps,
                       self.alpha_bkw)  # fmt: skip
        with torch.no_grad():
            phi, seen, finite = running_phi_update(self.running_phi, self.num_batches_tracked,
                                                   psi2.detach(), count, self.alpha_fwd,
                                                   self.warmup_iters)  # fmt: skip
            self.running_phi.copy_(phi)
            self.num_batches_tracked.copy_(seen)
        if _can_read(finite, self.nonfinite == "raise") and not bool(finite):
            self._skip_nonfinite()
        return y

    def _skip_nonfinite(self) -> None:
        msg = (f"{type(self).__name__}: a training batch produced non-finite statistics (NaN or "
               "Inf in the input); running_phi was not updated")  # fmt: skip
        if self.nonfinite == "raise":
            raise NonFiniteStatisticsError(msg)
        if not self._warned_nonfinite:
            warnings.warn(msg + " (warned once per layer)", RuntimeWarning, stacklevel=4)
            self._warned_nonfinite = True

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{name}: expected 2D (N, C) or 3D {self._layout_text()} input, "
                             f"got {x.dim()}D input of shape {tuple(x.shape)}")  # fmt: skip
        dim = 2 if self.layout == "nlc" and x.dim() == 3 else 1
        if x.shape[dim] != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels in dim {dim} "
                             f"(num_features={self.num_features}), got input of shape "
                             f"{tuple(x.shape)}")  # fmt: skip
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")

    def _layout_text(self) -> str:
        return "(N, L, C)" if self.layout == "nlc" else "(N, C, L)"

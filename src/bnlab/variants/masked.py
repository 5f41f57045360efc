"""Masked Batch Normalization for padded sequences: statistics from valid positions only."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import functional_variants as FV
from .._base import _check_choice, _kernels_capturing, _NormBase

__all__ = ["MaskedBatchNorm1d"]

Layout = Literal["ncl", "nlc"]


class MaskedBatchNorm1d(_NormBase, nn.BatchNorm1d):
    r"""Batch Normalization over a padded batch of sequences, from its valid positions only.

    Padding a batch of sequences to its longest member and applying ``BatchNorm1d`` lets the
    padded positions into the mean and variance (lengths {4, 2} padded with zeros: mean 1.5
    instead of 3.0). This layer counts the valid positions :math:`V` (``mask[n, l]`` true) only:

    .. math::

        \mu = \frac{1}{|V|} \sum_{(n, l) \in V} x_{n, :, l}, \qquad
        \sigma^2 = \frac{1}{|V|} \sum_{(n, l) \in V} (x_{n, :, l} - \mu)^2

        y_{n, :, l} = \frac{x_{n, :, l} - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta
        \ \text{for}\ (n, l) \in V, \qquad y_{n, :, l} = 0 \ \text{otherwise}

    (:math:`\mu, \sigma^2, \gamma, \beta` all ``(C,)``). The **biased** variance normalises;
    the running estimate gets the **unbiased** one, :math:`\sigma^2 |V| / (|V| - 1)`, through
    the layer's running policy (``running="ema"``, ``"cumulative"`` or ``"window"``), one update
    per training batch. Padded outputs are exactly zero and receive zero gradient. Evaluation
    normalises the valid positions with the running statistics and zeroes the padded ones.
    Without ``mask`` and ``lengths`` the layer is exactly ``torch.nn.BatchNorm1d``.

    The masked path is tensor ops only (no value is read in a graph), so under
    ``torch.compile(fullgraph=True)`` one graph serves every mask of a shape. The checks that
    read values (``lengths`` in ``[0, L]``, at least 2 valid positions in training) run in
    eager mode; in a graph a batch with fewer than 2 valid positions leaves the running
    statistics as they were.

    Args:
        num_features: ``C``, the number of channels.
        eps, momentum, affine, track_running_stats: as in ``torch.nn.BatchNorm1d``.
        layout: ``"ncl"`` for ``(N, C, L)`` inputs (torch's), ``"nlc"`` for ``(N, L, C)``
            (transformers'), keyword-only. Default: ``"ncl"``.
        bias, running, window_size, nonfinite: as in :class:`bnlab.BatchNorm1d`.
        process_group: must be ``None``: synchronised masked statistics are not supported yet.
        device, dtype: factory arguments for the parameters and buffers.

    Shape:
        - Input: ``(N, C, L)`` (``layout="nlc"``: ``(N, L, C)``); without a mask also ``(N, C)``.
        - ``mask``: boolean ``(N, L)``, true at valid positions; or ``lengths``: integer
          ``(N,)`` with values in ``[0, L]`` (the first ``lengths[n]`` positions are valid).
        - Output: same shape and dtype as the input.

    Example::

        >>> import torch, bnlab
        >>> bn = bnlab.MaskedBatchNorm1d(3)
        >>> x = torch.randn(2, 3, 4)
        >>> y = bn(x, lengths=torch.tensor([4, 2]))
        >>> bool((y[1, :, 2:] == 0).all())
        True
    """

    _sync_policy = "refuse"

    def __init__(self, *args: Any, layout: Layout = "ncl", **kwargs: Any) -> None:
        name = type(self).__name__
        _check_choice(name, "layout", layout, Layout)
        if kwargs.get("process_group") is not None:
            raise ValueError(
                f"{name}: process_group is not supported yet (synchronised masked statistics "
                f"are not implemented), got process_group={kwargs['process_group']!r}; "
                "use process_group=None"
            )
        if kwargs.get("normalize_with", "batch") != "batch":
            raise ValueError(f"{name}: normalize_with must be 'batch' (masked statistics), got "
                             f"{kwargs['normalize_with']!r}")  # fmt: skip
        super().__init__(*args, **kwargs)
        self.layout = layout

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}"

    def forward(
        self, x: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        nlc = self.layout == "nlc" and isinstance(x, Tensor) and x.dim() == 3
        xc = x.transpose(1, 2) if nlc else x
        if mask is None and lengths is None:
            y = super().forward(xc)  # exactly BatchNorm1d
        else:
            self._check_input(xc)
            y = self._masked_forward(xc, self._valid_mask(xc, mask, lengths))
        return y.transpose(1, 2) if nlc else y

    def _masked_forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if not self.training and self.track_running_stats:
            return FV.masked_normalize(x, mask, self.running_mean, self.running_var,
                                       self.weight, self.bias, self.eps)  # fmt: skip
        mean, var, count = FV.masked_batch_stats(x, mask)
        if self.training and not _kernels_capturing(x) and int(count) <= 1:
            raise ValueError(
                f"{type(self).__name__}: Expected more than 1 valid position per channel when "
                f"training, got {int(count)} in mask of shape {tuple(mask.shape)}; "
                "give mask/lengths with at least 2 valid positions in the batch"
            )
        y = FV.masked_normalize(x, mask, mean, var, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            # In a graph (no check above) a batch of < 2 valid positions must not move the
            # statistics: a NaN mean makes running_update keep every buffer as it was.
            mean = torch.where(count > 1, mean.detach(), torch.nan)
            self._update_running(mean, var.detach(), count)
        return y

    def _valid_mask(self, x: Tensor, mask: Tensor | None, lengths: Tensor | None) -> Tensor:
        """The boolean ``(N, L)`` mask of valid positions, after checking the arguments."""
        return valid_mask(type(self).__name__, x, mask, lengths, self._layout_text())

    def _layout_text(self) -> str:
        return "(N, L, C)" if self.layout == "nlc" else "(N, C, L)"


def valid_mask(
    name: str, x: Tensor, mask: Tensor | None, lengths: Tensor | None, layout_text: str
) -> Tensor:
    """The boolean ``(N, L)`` mask of valid positions of ``x`` ``(N, C, L)`` from ``mask`` or
    ``lengths``, after checking them; ``name`` is the layer named in the errors and
    ``layout_text`` its input layout. Shared by every masked layer."""
    if x.dim() != 3:
        raise ValueError(
            f"{name}: mask/lengths need a 3D input ({layout_text}), "
            f"got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    n, _, length = x.shape
    if mask is not None and lengths is not None:
        raise ValueError(f"{name}: give mask or lengths, not both; got both")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"{name}: mask must be a torch.bool tensor (true = valid), "
                            f"got {got}; use mask.bool() or lengths=")  # fmt: skip
        if tuple(mask.shape) != (n, length):
            raise ValueError(f"{name}: mask must have shape (N, L) = {(n, length)}, got "
                             f"{tuple(mask.shape)}")  # fmt: skip
        if mask.device != x.device:
            raise ValueError(f"{name}: mask must be on the input's device {x.device}, got "
                             f"{mask.device}; use mask.to(x.device)")  # fmt: skip
        return mask
    if not isinstance(lengths, Tensor) or lengths.is_floating_point() or lengths.is_complex() \
            or lengths.dtype == torch.bool:  # fmt: skip
        got = lengths.dtype if isinstance(lengths, Tensor) else type(lengths).__name__
        raise TypeError(f"{name}: lengths must be an integer tensor of shape (N,), got {got}")
    if tuple(lengths.shape) != (n,):
        raise ValueError(f"{name}: lengths must have shape (N,) = ({n},), got "
                         f"{tuple(lengths.shape)}")  # fmt: skip
    if lengths.device != x.device:
        raise ValueError(f"{name}: lengths must be on the input's device {x.device}, got "
                         f"{lengths.device}; use lengths.to(x.device)")  # fmt: skip
    if n and not _kernels_capturing(x):
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > length:
            raise ValueError(f"{name}: lengths must be in [0, L={length}], got values in "
                             f"[{lo}, {hi}]")  # fmt: skip
    return torch.arange(length, device=x.device)[None, :] < lengths[:, None]

"""Models of padded variable-length sequences that take the mask of valid positions.

Input ``x`` is ``(N, C, L)``, zero after each sequence's own length; ``mask`` is boolean
``(N, L)``, true at valid positions (``None``: every position is valid). Both models zero the
padded positions after every layer, so the valid positions' outputs do not depend on how much
padding a batch has except through a normaliser that counts the padding:

* ``"none"``: no normaliser;
* ``"layernorm"``: ``torch.nn.LayerNorm`` over the channels of each position (the
  transformer's LayerNorm; padding never enters it);
* ``"bn-padded"``: Batch Normalization over batch and positions of the padded batch, zeros
  included (:class:`bnlab.MaskedBatchNorm1d` called without its mask, which is exactly
  ``BatchNorm1d``);
* ``"bn-masked"``: the same layer given the mask: statistics from the valid positions only;
* ``"powernorm"``: :class:`bnlab.PowerNorm` (Shen et al. 2020) given the mask.

:class:`SequenceCNN` is a stack of stride-1 ``Conv1d`` - norm - ReLU blocks and a masked mean
over positions; :class:`SequenceTransformer` a pre-norm transformer encoder with a key-padding
mask, its normalisers in the ``(N, L, C)`` layout, and a masked mean over tokens.
:class:`MaskChannel` carries the mask as one more input channel, so the lab's one training
loop, which passes a single tensor, trains and evaluates them unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from bnlab import MaskedBatchNorm1d, PowerNorm

__all__ = ["SEQUENCE_NORMS", "SequenceNorm", "SequenceCNN", "SequenceTransformer",
           "MaskChannel", "with_mask_channel"]

SEQUENCE_NORMS = ("none", "layernorm", "bn-padded", "bn-masked", "powernorm")
Layout = Literal["ncl", "nlc"]


class SequenceNorm(nn.Module):
    """One of :data:`SEQUENCE_NORMS` over ``num_features`` channels, called as
    ``norm(x, mask)`` with ``x`` in ``layout`` (``"ncl"``: ``(N, C, L)``, ``"nlc"``:
    ``(N, L, C)``). ``kwargs`` go to the layer (``torch.nn.LayerNorm``,
    :class:`bnlab.MaskedBatchNorm1d` or :class:`bnlab.PowerNorm`)."""

    def __init__(self, norm: str, num_features: int, layout: Layout = "ncl",
                 **kwargs: Any) -> None:
        super().__init__()
        if norm not in SEQUENCE_NORMS:
            raise ValueError(f"unknown sequence normaliser {norm!r}; valid names: "
                             f"{', '.join(sorted(SEQUENCE_NORMS))}")
        if layout not in ("ncl", "nlc"):
            raise ValueError(f"SequenceNorm: layout must be 'ncl' or 'nlc', got {layout!r}")
        self.kind, self.layout = norm, layout
        if norm == "none":
            self.norm: nn.Module = nn.Identity()
        elif norm == "layernorm":
            self.norm = nn.LayerNorm(num_features, **kwargs)
        elif norm == "powernorm":
            self.norm = PowerNorm(num_features, layout=layout, **kwargs)
        else:
            self.norm = MaskedBatchNorm1d(num_features, layout=layout, **kwargs)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.kind == "none":
            return x
        if self.kind == "layernorm":
            return self.norm(x) if self.layout == "nlc" else \
                self.norm(x.transpose(1, 2)).transpose(1, 2)
        if self.kind == "bn-padded":
            return self.norm(x)  # every position counts, the padding's zeros too
        return self.norm(x, mask=mask)


def _full_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
    if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"mask must be a bool tensor of shape (N, L) = "
                         f"{(x.shape[0], x.shape[2])}, got {mask.dtype} {tuple(mask.shape)}")
    return mask


def _masked_mean(h: Tensor, m: Tensor, dim: int) -> Tensor:
    """Mean over the valid positions (``m``: 1 valid, 0 padded, broadcast to ``h``)."""
    return (h * m).sum(dim) / m.sum(dim).clamp(min=1)


class SequenceCNN(nn.Module):
    """``depth`` blocks Conv1d(k, stride 1, same padding) - norm - ReLU, masked mean pool,
    Linear; padded positions are zeroed after each convolution and each block."""

    def __init__(self, in_channels: int, num_classes: int, norm: str = "none", *,
                 channels: int = 32, depth: int = 3, kernel_size: int = 5,
                 norm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SequenceCNN: kernel_size must be odd (same padding), got "
                             f"{kernel_size}")
        widths = [in_channels] + [channels] * depth
        self.convs = nn.ModuleList(nn.Conv1d(a, b, kernel_size, padding=kernel_size // 2)
                                   for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.norms = nn.ModuleList(SequenceNorm(norm, channels, **(norm_kwargs or {}))
                                   for _ in range(depth))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _full_mask(x, mask)
        m = mask[:, None, :].to(x.dtype)
        h = x * m
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = torch.relu(norm(conv(h) * m, mask)) * m
        return self.head(_masked_mean(h, m, 2))


class _Block(nn.Module):
    def __init__(self, norm: str, dim: int, heads: int, kw: dict[str, Any]) -> None:
        super().__init__()
        self.n1 = SequenceNorm(norm, dim, "nlc", **kw)
        self.n2 = SequenceNorm(norm, dim, "nlc", **kw)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, mask: Tensor, m: Tensor) -> Tensor:
        h = self.n1(x, mask)
        x = (x + self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]) * m
        return (x + self.mlp(self.n2(x, mask))) * m


class SequenceTransformer(nn.Module):
    """A pre-norm transformer encoder: a convolutional token embedding (``Conv1d`` of
    ``embed_kernel`` positions, stride 1, so one token per position) plus learned positions,
    ``depth`` blocks (attention with a key-padding mask, an MLP of width ``2 dim``), a final
    norm, masked mean over tokens, Linear. Sequences up to ``max_length`` positions."""

    def __init__(self, in_channels: int, num_classes: int, norm: str = "none", *,
                 dim: int = 32, heads: int = 4, depth: int = 2, max_length: int = 64,
                 embed_kernel: int = 5, norm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if embed_kernel % 2 != 1:
            raise ValueError(f"SequenceTransformer: embed_kernel must be odd (same padding), "
                             f"got {embed_kernel}")
        self.embed = nn.Conv1d(in_channels, dim, embed_kernel, padding=embed_kernel // 2)
        self.pos = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        kw = dict(norm_kwargs or {})
        self.blocks = nn.ModuleList(_Block(norm, dim, heads, kw) for _ in range(depth))
        self.final = SequenceNorm(norm, dim, "nlc", **kw)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _full_mask(x, mask)
        length = x.shape[2]
        if length > self.pos.shape[1]:
            raise ValueError(f"SequenceTransformer: sequences of {length} positions exceed "
                             f"max_length={self.pos.shape[1]}; build it with a larger max_length")
        m = mask[:, :, None].to(x.dtype)
        h = (self.embed(x * m.transpose(1, 2)).transpose(1, 2) + self.pos[:, :length]) * m
        for block in self.blocks:
            h = block(h, mask, m)
        return self.head(_masked_mean(self.final(h, mask) * m, m, 1))


class MaskChannel(nn.Module):
    """``model(x, mask)`` as a model of one tensor ``z = (N, C + 1, L)``: the channels of
    ``x`` and then the mask as 0/1 (:func:`with_mask_channel`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor) -> Tensor:
        return self.model(z[:, :-1], z[:, -1] > 0.5)


def with_mask_channel(x: Tensor, lengths: Tensor) -> Tensor:
    """``x (N, C, L)`` with one more channel, 1 at the first ``lengths[n]`` positions."""
    valid = torch.arange(x.shape[2])[None, :] < lengths[:, None]
    return torch.cat([x, valid[:, None, :].to(x.dtype)], 1)

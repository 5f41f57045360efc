"""S copies of one small network packed into one wider network, so S seeds train at once.

The studies' networks are small; on a CPU their time goes to per-operation overhead, so S
seeds trained one after the other cost S times the overhead. BN's statistics are per channel,
so S members fit in one network whose every layer keeps the members apart:

* activations are ``(B, S*C, ...)``: member ``s`` owns channels ``s*C .. (s+1)*C - 1`` and its
  own batch of ``B`` examples (its own data order);
* a convolution becomes a grouped convolution (``groups=S``), a ``Linear`` a batched matrix
  product over the members;
* a BN layer over ``C`` channels becomes the same layer over ``S*C`` channels: its batch
  statistics and running statistics are per channel, hence per member; GroupNorm's groups
  (and the LayerNorm that ``make_norm("ln")`` builds as one group) likewise;
* activations, pooling and ``Flatten`` act per channel and need no change.

An MLP whose only norm is ``BatchNorm1d`` (``ioffe_mlp``, ``deep_mlp``, ``mnist1d_mlp``)
runs *feature-major* instead: activations are ``(S, C, B)``, so each ``Linear`` is one
batched product on contiguous operands, ``weight (S, out, in) @ x (S, in, B)``, and each BN
sees the same memory as ``(1, S*C, B)``, whose statistics over ``B`` are per channel and
member. The ``(B, S*C)`` layout needs a transposing copy around every product: on
``ioffe_mlp``'s five seeds those copies were 15% of a step.

Every packed tensor is the concatenation of the members' tensors along one dimension (a
``Linear`` weight is stored as ``(S*out, in)``); :meth:`Pack.sync` copies the slices back into
the member modules, which are then ordinary models (evaluate, probe, recalibrate them).

Networks with a layer that cannot be packed exactly (dropout draws its masks from one random
stream; attention mixes positions in a way this scheme does not cover) raise
:class:`NotPackable`; the caller trains those seeds one by one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["NotPackable", "Pack", "pack"]

_ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Identity)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
_PER_ELEMENT = _ACTIVATIONS + _POOLS  # act per channel: the same layer serves the pack


class NotPackable(TypeError):
    """A network has a layer that :func:`pack` cannot pack exactly."""


class _PackedLinear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None, members: int,
                 feature_major: bool = False) -> None:
        super().__init__()
        self.members = members
        self.feature_major = feature_major
        self.out_features = weight.shape[0] // members
        self.in_features = weight.shape[1]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        s = self.members
        if self.feature_major:  # x: (S, in, B) -> (S, out, B), no copy
            w = self.weight.view(s, self.out_features, self.in_features)
            if self.bias is None:
                return torch.bmm(w, x)
            return torch.baddbmm(self.bias.view(s, self.out_features, 1), w, x)
        n = x.shape[0]
        xs = x.reshape(n, s, self.in_features).transpose(0, 1)  # (S, B, in)
        w = self.weight.view(s, self.out_features, self.in_features).transpose(1, 2)
        if self.bias is None:
            y = torch.bmm(xs, w)
        else:
            y = torch.baddbmm(self.bias.view(s, 1, self.out_features), xs, w)
        return y.transpose(0, 1).reshape(n, s * self.out_features)


class _FeatureMajorNorm(nn.Module):
    """A BN layer over ``S*C`` channels applied to feature-major ``(S, C, B)`` activations,
    seen as ``(1, S*C, B)``: the statistics over ``B`` are those of each member's channel."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        s, c, n = x.shape
        return self.norm(x.reshape(1, s * c, n)).view(s, c, n)


def _feature_major(layers: list[nn.Module]) -> bool:
    """Whether a network (as a flat layer list) can run feature-major: Flatten first, then
    only Linear, bnlab's plain BatchNorm1d and activations (no pooling: in (S, C, B) it
    would pool over the batch)."""
    from bnlab.batchnorm import BatchNorm1d

    return (bool(layers) and type(layers[0]) is nn.Flatten
            and all(type(m) in (nn.Linear, BatchNorm1d, *_ACTIVATIONS) for m in layers[1:]))


class _Unsqueeze(nn.Module):
    """``(B, S*L)`` sequences of each member as one-channel signals ``(B, S, L)``."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.members, -1) if x.dim() == 2 else x


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model as a flat list of layers applied in order."""
    from ..models import MNIST1DCNN

    if isinstance(model, MNIST1DCNN):
        return [_Unsqueeze(1), *model.features, nn.Flatten(), model.linear]
    if isinstance(model, nn.Sequential):
        return list(model)
    raise NotPackable(f"cannot pack {type(model).__name__}: only nn.Sequential (and MNIST1DCNN)")


# one entry per packed tensor: (packed module, tensor name, member tensors, concatenation dim)
_Entry = tuple[nn.Module, str, list[Tensor], int | None]


def _cat(tensors: list[Tensor], dim: int | None) -> Tensor:
    if dim is None:
        first = tensors[0]
        if any(not torch.equal(first, t) for t in tensors[1:]):
            raise NotPackable("a shared counter differs between the members")
        return first.detach().clone()
    return torch.cat([t.detach() for t in tensors], dim)


def _pack_layer(layers: list[nn.Module], s: int, entries: list[_Entry],
                feature_major: bool = False) -> nn.Module:
    from bnlab._base import _NormBase

    first = layers[0]
    if isinstance(first, _Unsqueeze):
        return _Unsqueeze(s)
    if isinstance(first, nn.Flatten):
        if first.start_dim != 1 or first.end_dim != -1:
            raise NotPackable("Flatten must flatten from dimension 1 to the end")
        # feature-major: Pack.__call__ has already flattened the input into (S, in, B)
        return nn.Identity() if feature_major else nn.Flatten()
    if type(first) in _PER_ELEMENT:
        return copy.deepcopy(first)
    if type(first) is nn.Linear:
        packed = _PackedLinear(_cat([m.weight for m in layers], 0),
                               None if first.bias is None else _cat([m.bias for m in layers], 0),
                               s, feature_major)
    elif type(first) in (nn.Conv1d, nn.Conv2d):
        if first.padding_mode != "zeros":
            raise NotPackable("only zero-padded convolutions")
        packed = copy.deepcopy(first)
        packed.in_channels *= s
        packed.out_channels *= s
        packed.groups *= s
    elif type(first) is nn.GroupNorm:
        packed = copy.deepcopy(first)
        packed.num_groups *= s
        packed.num_channels *= s
    elif isinstance(first, _NormBase):
        packed = copy.deepcopy(first)
        packed.num_features *= s
    else:
        raise NotPackable(f"cannot pack a {type(first).__name__} layer exactly")
    # every parameter and buffer: members concatenated on the channel (last) dimension, or on
    # dimension 0 for weights and biases; 0-dim counters are shared and must agree
    for kind in ("_parameters", "_buffers"):
        for name, t in getattr(first, kind).items():
            if t is None:
                continue
            members = [getattr(m, kind)[name] for m in layers]
            dim = None if t.dim() == 0 else (0 if kind == "_parameters" else t.dim() - 1)
            value = _cat(members, dim)
            if kind == "_parameters":
                setattr(packed, name, nn.Parameter(value, requires_grad=t.requires_grad))
            else:
                packed._buffers[name] = value
            entries.append((packed, name, members, dim))
    if feature_major and isinstance(packed, _NormBase):
        return _FeatureMajorNorm(packed)
    return packed


class Pack:
    """``S`` member networks of one architecture and the packed network that trains them."""

    def __init__(self, members: Sequence[nn.Module],
                 prepare: Callable[[Tensor], Tensor] | None = None) -> None:
        self.members = list(members)
        s = len(self.members)
        if s < 1:
            raise ValueError("Pack needs at least one member")
        per_member = [_layers(m) for m in self.members]
        if len({len(p) for p in per_member}) != 1 or any(
                type(a) is not type(b) for p in per_member for a, b in zip(p, per_member[0],
                                                                             strict=True)):
            raise NotPackable("the members differ in architecture")
        self._entries: list[_Entry] = []
        self.feature_major = _feature_major(per_member[0])
        self.model = nn.Sequential(*[_pack_layer([p[i] for p in per_member], s, self._entries,
                                                 self.feature_major)
                                     for i in range(len(per_member[0]))])
        self.model.train(self.members[0].training)

    def __len__(self) -> int:
        return len(self.members)

    def __call__(self, x: Tensor) -> Tensor:
        """``x`` is ``(S, B, ...)``, one batch per member; returns ``(S, B, out)``."""
        s, n = x.shape[0], x.shape[1]
        if s != len(self):
            raise ValueError(f"Pack of {len(self)} members got inputs for {s}")
        if self.feature_major:  # (S, B, ...) -> (S, in, B) -> (S, out, B) -> (S, B, out)
            return self.model(x.reshape(s, n, -1).transpose(1, 2)).transpose(1, 2)
        if x.dim() == 3 and isinstance(self.model[0], _Unsqueeze):
            flat = x.transpose(0, 1).reshape(n, -1)
        else:
            flat = x.transpose(0, 1).reshape(n, s * x.shape[2], *x.shape[3:])
        y = self.model(flat)
        return y.view(n, s, -1).transpose(0, 1)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def buffers(self) -> list[Tensor]:
        return [getattr(mod, name) for mod, name, _, _ in self._entries
                if name in mod._buffers]

    def save_buffers(self) -> list[Tensor]:
        return [b.clone() for b in self.buffers()]

    def restore_buffers(self, saved: list[Tensor]) -> None:
        for b, v in zip(self.buffers(), saved, strict=True):
            b.copy_(v)

    def _slice(self, t: Tensor, k: int, size: int, dim: int | None) -> Tensor:
        return t if dim is None else t.narrow(dim, k * size, size)

    @torch.no_grad()
    def sync(self, which: Sequence[int] | None = None) -> None:
        """Copy the packed tensors' slices into the member modules (all, or ``which``)."""
        ks = range(len(self)) if which is None else which
        for mod, name, members, dim in self._entries:
            t = getattr(mod, name)
            for k in ks:
                size = 1 if dim is None else members[k].shape[dim]
                members[k].copy_(self._slice(t, k, size, dim))

    def optimizer_state_for(self, keep: Sequence[int], old: torch.optim.Optimizer,
                            new_pack: Pack, new: torch.optim.Optimizer) -> None:
        """Move ``old``'s per-element state of members ``keep`` into ``new`` (for ``new_pack``)."""
        params_old = [(mod, name, members, dim) for mod, name, members, dim in self._entries
                      if name in mod._parameters]
        params_new = [getattr(mod, name) for mod, name, _, _ in new_pack._entries
                      if name in mod._parameters]
        for (mod, name, members, dim), p_new in zip(params_old, params_new, strict=True):
            state = old.state.get(getattr(mod, name))
            if not state:
                continue
            moved = {}
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == getattr(mod, name).shape \
                        and dim is not None:
                    size = members[0].shape[dim]
                    moved[key] = torch.cat([self._slice(value, k, size, dim) for k in keep], dim)
                else:
                    moved[key] = value.clone() if isinstance(value, Tensor) else value
            new.state[p_new] = moved


def pack(members: Sequence[nn.Module]) -> Pack:
    """Pack ``members`` (same architecture, any weights); raises :class:`NotPackable`."""
    return Pack(members)

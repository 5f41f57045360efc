"""A small ResNet for 28x28 images (MNIST, Fashion-MNIST), normaliser as a parameter.

Stem ``conv3x3(16)``, then three stages of basic blocks with 16, 32 and 64 channels (strides
1, 2, 2), global average pooling and a linear read-out: ResNet-20's layout (He et al. 2016)
with ``blocks`` basic blocks per stage (default 1, about 75k parameters).

``act`` picks the activation (``relu``, or ``leaky_relu`` with slope 0.01) and ``bn_act`` how
each BN and its activation are built: ``"separate"`` (the norm layer, then the activation
module) or ``"inplace"`` (``norm="bn"`` only: one :class:`bnlab.BatchNormAct2d` with
``inplace=True``, which keeps only its output for backward; the second BN of a block, whose
activation follows the residual sum, becomes one with ``act="identity"``). Both have the same
state dict keys.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bnlab.fused import BatchNormAct2d
from bnlab.norms import make_norm

__all__ = ["BasicBlock", "SmallResNet", "small_resnet"]

_ACTS = ("relu", "leaky_relu")
_BN_ACT = ("separate", "inplace")


def _activation(act: str) -> nn.Module:
    return nn.ReLU() if act == "relu" else nn.LeakyReLU(0.01)


def _norm_act(norm: str, c: int, act: str, bn_act: str, kw: dict) -> tuple[nn.Module, nn.Module]:
    """``(norm, activation)``: with ``bn_act="inplace"`` the norm applies ``act`` itself and the
    activation module is the identity."""
    if bn_act == "inplace":
        return BatchNormAct2d(c, act=act, inplace=True, **kw), nn.Identity()
    return make_norm(norm, c, dim=2, **kw), _activation(act)


class BasicBlock(nn.Module):
    """``conv3x3 - norm - act - conv3x3 - norm`` plus a shortcut (1x1 conv when shapes differ),
    then ``act``."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, norm_kwargs: dict,
                 act: str = "relu", bn_act: str = "separate") -> None:  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1, self.act1 = _norm_act(norm, cout, act, bn_act, norm_kwargs)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2, _ = _norm_act(norm, cout, "identity" if bn_act == "inplace" else act,
                                  bn_act, norm_kwargs)  # fmt: skip
        self.relu = _activation(act)  # (the name of the block's output activation since v1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False),
                make_norm(norm, cout, dim=2, **norm_kwargs),
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, norm: str = "bn", *, in_channels: int = 1, num_classes: int = 10,
                 widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1,
                 norm_kwargs: dict[str, Any] | None = None, act: str = "relu",
                 bn_act: str = "separate") -> None:  # fmt: skip
        super().__init__()
        if blocks < 1:
            raise ValueError(f"SmallResNet: blocks must be >= 1, got {blocks}")
        if act not in _ACTS:
            raise ValueError(f"SmallResNet: act must be one of {list(_ACTS)}, got {act!r}")
        if bn_act not in _BN_ACT:
            raise ValueError(f"SmallResNet: bn_act must be one of {list(_BN_ACT)}, got {bn_act!r}")
        if bn_act == "inplace" and (norm != "bn" or act == "relu"):
            raise ValueError(
                "SmallResNet: bn_act='inplace' needs norm='bn' and an invertible activation "
                f"(act='leaky_relu'), got norm={norm!r}, act={act!r}"
            )
        kw = dict(norm_kwargs or {})
        stem_norm, stem_act = _norm_act(norm, widths[0], act, bn_act, kw)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), stem_norm, stem_act
        )
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1, norm, kw,
                                         act, bn_act))  # fmt: skip
                cin = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.stages(self.stem(x))
        return self.head(y.mean(dim=(2, 3)))


def small_resnet(norm: str = "bn", **kwargs: Any) -> SmallResNet:
    """A ResNet-20-style network sized for 28x28 inputs; see :class:`SmallResNet`."""
    return SmallResNet(norm, **kwargs)

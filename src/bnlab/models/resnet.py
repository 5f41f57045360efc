"""A small ResNet for 28x28 images (MNIST, Fashion-MNIST), normaliser as a parameter.

Stem ``conv3x3(16)``, then three stages of basic blocks with 16, 32 and 64 channels (strides
1, 2, 2), global average pooling and a linear read-out: ResNet-20's layout (He et al. 2016)
with ``blocks`` basic blocks per stage (default 1, about 75k parameters).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..norms import make_norm

__all__ = ["BasicBlock", "SmallResNet", "small_resnet"]


class BasicBlock(nn.Module):
    """``conv3x3 - norm - ReLU - conv3x3 - norm`` plus a shortcut (1x1 conv when shapes differ)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, norm_kwargs: dict) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, cout, dim=2, **norm_kwargs)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, cout, dim=2, **norm_kwargs)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False),
                make_norm(norm, cout, dim=2, **norm_kwargs),
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, norm: str = "bn", *, in_channels: int = 1, num_classes: int = 10,
                 widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1,
                 norm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"SmallResNet: blocks must be >= 1, got {blocks}")
        kw = dict(norm_kwargs or {})
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            make_norm(norm, widths[0], dim=2, **kw),
            nn.ReLU(),
        )
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1, norm, kw))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.stages(self.stem(x))
        return self.head(y.mean(dim=(2, 3)))


def small_resnet(norm: str = "bn", **kwargs: Any) -> SmallResNet:
    """A ResNet-20-style network sized for 28x28 inputs; see :class:`SmallResNet`."""
    return SmallResNet(norm, **kwargs)

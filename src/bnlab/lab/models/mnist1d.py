"""The MNIST-1D paper's MLP and 1-D CNN (Greydanus & Kobak), with an optional normaliser.

With ``norm="none"`` these are the paper's models (MLP 40-100-100-10 ReLU; CNN with three
Conv1d layers of 25 channels, strides 2, and a linear read-out of 125 features). Any other
norm is inserted after each hidden linear/convolution layer, before its ReLU.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bnlab.norms import make_norm

__all__ = ["mnist1d_mlp", "mnist1d_cnn", "MNIST1DCNN"]


def mnist1d_mlp(
    norm: str = "none",
    *,
    in_features: int = 40,
    hidden: int = 100,
    num_classes: int = 10,
    norm_kwargs: dict[str, Any] | None = None,
) -> nn.Sequential:
    """MLP ``40-100-100-10`` with ReLU; input ``(N, 40)`` (or ``(N, 1, 40)``, flattened)."""
    kw = dict(norm_kwargs or {})
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), make_norm(norm, hidden, dim=1, **kw), nn.ReLU(),
        nn.Linear(hidden, hidden), make_norm(norm, hidden, dim=1, **kw), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class MNIST1DCNN(nn.Module):
    """Conv1d(1->C, 5, s2, p1) - Conv1d(C->C, 3, s2, p1) x2 - Linear(C*5 -> 10), ReLU between."""

    def __init__(self, norm: str = "none", *, channels: int = 25, length: int = 40,
                 num_classes: int = 10, norm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        kw = dict(norm_kwargs or {})
        convs = [
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        ]
        blocks = []
        for conv in convs:
            blocks += [conv, make_norm(norm, channels, dim=1, **kw), nn.ReLU()]
            length = (length + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        self.features = nn.Sequential(*blocks)
        self.linear = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (N, L) sequences become one-channel signals
        return self.linear(self.features(x).flatten(1))


def mnist1d_cnn(norm: str = "none", **kwargs: Any) -> MNIST1DCNN:
    """The MNIST-1D paper's CNN; input ``(N, 40)`` or ``(N, 1, 40)``."""
    return MNIST1DCNN(norm, **kwargs)

"""Study ``beyond-images``: BN on 1-D signals and sequences (MNIST-1D)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import mnist1d_cnn, mnist1d_mlp
from ..norms import make_norm
from . import _data
from ._base import Study, StudyContext, StudyResult, Table, compare, fmt_ms, mean_std
from ._fit import FitConfig, fit

PAPER = {"mnist1d_mlp": 0.68, "mnist1d_cnn": 0.94}


class _TokenNorm(nn.Module):
    """A channel normaliser applied to ``(N, L, D)`` token sequences over ``D``."""

    def __init__(self, norm: str, dim: int) -> None:
        super().__init__()
        self.norm_name = norm
        # "bn": statistics per feature over batch and positions; "ln": per token over features
        self.norm = nn.LayerNorm(dim) if norm == "ln" else make_norm(norm, dim, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_name == "ln":
            return self.norm(x)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class _Block(nn.Module):
    def __init__(self, norm: str, dim: int, heads: int) -> None:
        super().__init__()
        self.n1, self.n2 = _TokenNorm(norm, dim), _TokenNorm(norm, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class SeqTransformer(nn.Module):
    """A two-block pre-norm transformer over the 40 positions of an MNIST-1D signal."""

    def __init__(self, norm: str = "ln", dim: int = 32, heads: int = 4, depth: int = 2,
                 length: int = 40, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(1, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(norm, dim, heads) for _ in range(depth)])
        self.head = nn.Sequential(_TokenNorm(norm, dim), nn.Flatten(),
                                  nn.Linear(dim * length, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.embed(x.reshape(len(x), -1, 1)) + self.pos))


MODELS = {"mnist1d_mlp": mnist1d_mlp, "mnist1d_cnn": mnist1d_cnn, "transformer": SeqTransformer}


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.mnist1d(ctx)
    acc: dict[tuple[str, str], list[float]] = {}
    rows = []
    for model_name, build in MODELS.items():
        for norm in ("none", "bn", "ln"):
            key = (model_name, norm)
            acc[key] = []
            steps = s["steps"] if model_name != "transformer" else s["seq_steps"]
            for seed in ctx.seeds:
                torch.manual_seed(seed)
                cfg = FitConfig(steps=steps, batch_size=100, lr=s["lr"], optimizer="adam",
                                seed=seed)
                res = fit(build(norm), data.x_train, data.y_train, data.x_test, data.y_test, cfg)
                acc[key].append(res.final_test_acc)
            ctx.log(f"beyond-images {model_name} {norm}: {fmt_ms(acc[key], 3)}")
            paper = PAPER.get(model_name) if norm == "none" else None
            rows.append([model_name, norm, fmt_ms(acc[key], 4),
                         f"{paper:.2f}" if paper else "-"])
    verdicts = {m: compare(acc[(m, "bn")], acc[(m, "none")]) for m in MODELS}
    v_seq = compare(acc[("transformer", "bn")], acc[("transformer", "ln")])
    helped = [m for m, (v, _) in verdicts.items() if v == "supported"]
    hurt = [m for m, (v, _) in verdicts.items() if v == "contradicted"]
    verdict = "supported" if len(helped) >= 2 and not hurt else (
        "contradicted" if len(hurt) >= 2 else "not shown")
    evidence = "; ".join(
        f"{m}: BN {mean_std(acc[(m, 'bn')])[0]:.3f} vs none {mean_std(acc[(m, 'none')])[0]:.3f}"
        f" vs LN {mean_std(acc[(m, 'ln')])[0]:.3f} ({verdicts[m][0]})" for m in MODELS
    ) + (f"; in the transformer BN vs LN: {v_seq[1]:+.3f} ({v_seq[0]}); paper without norm: "
         f"MLP 68%, CNN 94%")
    return StudyResult(
        verdict=verdict, evidence=evidence,
        measured="Test accuracy on MNIST-1D (4000/1000 sequences of length 40) of the paper's "
                 "MLP and 1-D CNN and a small transformer, with none, BN and LayerNorm.",
        tables=[Table("MNIST-1D test accuracy", ["model", "norm", "test acc", "paper"], rows)],
        numbers={"acc": {f"{m}/{n}": v for (m, n), v in acc.items()},
                 "verdicts": {m: list(v) for m, v in verdicts.items()},
                 "transformer_bn_vs_ln": list(v_seq)},
    )


STUDY = Study(
    name="beyond-images",
    claim="BN applies beyond images: to sequences and other 1-D data (NLP, biology).",
    method="MNIST-1D from the mnist1d generator; the paper's MLP and CNN (norm inserted before "
           "each ReLU) and a 2-block pre-norm transformer over the 40 positions, with none, "
           "BN (statistics over batch and positions) and LayerNorm; Adam, batch 100.",
    presets={
        "quick": {"steps": 1500, "seq_steps": 800, "lr": 3e-3},
        "full": {"steps": 6000, "seq_steps": 4000, "lr": 3e-3},
    },
    run=run,
)

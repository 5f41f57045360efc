"""Study ``beyond-images``: BN on 1-D signals and sequences (MNIST-1D)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab.norms import make_norm

from ..models import mnist1d_cnn, mnist1d_mlp
from . import _data
from ._base import Comparison, Study, StudyContext, StudyResult, Table, fmt_ms, judge
from ._fit import FitConfig, fit_seeds

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


def decide(numbers: dict) -> list[Comparison]:
    """Headline: per seed, test accuracy averaged over the three models, BN vs none."""
    acc = numbers["acc"]
    n = len(acc[f"{next(iter(MODELS))}/bn"])

    def mean_over_models(norm: str, k: int) -> float:
        return sum(acc[f"{m}/{norm}"][k] for m in MODELS) / len(MODELS)

    return [
        judge("test accuracy, mean over the MLP, the CNN and the transformer",
              [mean_over_models("bn", k) for k in range(n)],
              [mean_over_models("none", k) for k in range(n)], with_label="BN",
              without_label="none"),
        *[judge(f"{m} test accuracy", acc[f"{m}/bn"], acc[f"{m}/none"], with_label="BN",
                without_label="none") for m in MODELS],
        judge("transformer test accuracy", acc["transformer/bn"], acc["transformer/ln"],
              with_label="BN", without_label="LayerNorm"),
    ]


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.mnist1d(ctx)
    acc: dict[tuple[str, str], list[float]] = {}
    rows = []
    for model_name, build in MODELS.items():
        for norm in ("none", "bn", "ln"):
            key = (model_name, norm)
            steps = s["steps"] if model_name != "transformer" else s["seq_steps"]
            cfg = FitConfig(steps=steps, batch_size=100, lr=s["lr"], optimizer="adam")
            # the MLP and CNN train their seeds together; attention is not packed, so the
            # transformer trains seed by seed (bnlab.lab.studies._fit.fit_seeds)
            trained = fit_seeds(lambda build=build, norm=norm: build(norm), ctx.seeds,
                                data.x_train, data.y_train, data.x_test, data.y_test, cfg)
            acc[key] = [res.final_test_acc for _, res in trained]
            ctx.log(f"beyond-images {model_name} {norm}: {fmt_ms(acc[key], 3)}")
            paper = PAPER.get(model_name) if norm == "none" else None
            rows.append([model_name, norm, fmt_ms(acc[key], 4),
                         f"{paper:.2f}" if paper else "-"])
    numbers = {"acc": {f"{m}/{n}": v for (m, n), v in acc.items()}}
    comparisons = decide(numbers)
    numbers["verdicts"] = {m: [c.verdict, c.diff] for m, c in zip(MODELS, comparisons[1:4],
                                                                   strict=True)}
    numbers["transformer_bn_vs_ln"] = [comparisons[4].verdict, comparisons[4].diff]
    evidence = "; ".join(c.sentence() for c in comparisons) + (
        "; paper without norm: MLP 68%, CNN 94%")
    return StudyResult(
        verdict=comparisons[0].verdict, evidence=evidence, comparisons=comparisons,
        measured="Test accuracy on MNIST-1D (4000/1000 sequences of length 40) of the paper's "
                 "MLP and 1-D CNN and a small transformer, with none, BN and LayerNorm.",
        tables=[Table("MNIST-1D test accuracy", ["model", "norm", "test acc", "paper"], rows)],
        numbers=numbers,
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
    decide=decide,
)

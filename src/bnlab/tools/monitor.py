"""Watch every BN layer while a model trains: activations, statistics drift, gradients, gamma/beta.

``with Monitor(model) as mon: ...train...`` records, for each BN layer and each forward of
``model`` (one ``step``; every ``every``-th is recorded):

* ``in_*`` / ``out_*``: mean, std and the 15th/50th/85th percentiles of the values entering and
  leaving the layer (Ioffe & Szegedy 2015, Figure 1, plot these percentiles over training);
* ``drift_mean``: mean over channels of ``|batch mean - running mean| / sqrt(running var + eps)``
  and ``drift_var``: mean over channels of ``batch var / running var`` (biased batch variance;
  1 means no drift), both against the running statistics *before* this batch updates them;
* ``grad_in_norm`` / ``grad_out_norm``: L2 norms of the gradient at the layer's input and
  output, filled in when ``backward`` runs (vanishing or exploding gradients show here);
* ``gamma_*`` / ``beta_*``: mean, std, min and max of the affine parameters.

Hooks are removed when the ``with`` block ends, also on error. ``to_rows()`` gives flat dicts
for a metrics file (JSONL/CSV); ``plot(path)`` draws them with matplotlib's Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._checks import check_module
from ._graph import bn_layers

__all__ = ["Monitor", "summary_stats"]

PERCENTILES = (15, 50, 85)


def summary_stats(x: Tensor, max_samples: int = 65536) -> dict[str, float]:
    """Mean, std and 15/50/85th percentiles of all values of ``x`` (a strided subsample of at
    most ``max_samples`` values for the percentiles)."""
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        return {}
    std, mean = torch.std_mean(flat, correction=0)
    sample = flat[:: max(1, flat.numel() // max_samples)][:max_samples]
    q = torch.quantile(sample, torch.tensor([p / 100 for p in PERCENTILES]))
    out = {"mean": float(mean), "std": float(std)}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, q, strict=True)})
    return out


def _param_stats(t: Tensor | None) -> dict[str, float]:
    if t is None:
        return {}
    t = t.detach().float()
    return {"mean": float(t.mean()), "std": float(t.std(correction=0)),
            "min": float(t.min()), "max": float(t.max())}


class Monitor:
    """Context manager recording per-BN-layer statistics of ``model``; see the module doc."""

    def __init__(self, model: nn.Module, every: int = 1, max_samples: int = 65536) -> None:
        check_module("Monitor", "model", model)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Monitor: every must be a positive int, got {every!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"Monitor: max_samples must be a positive int, got {max_samples!r}")
        self.model = model
        self.every = every
        self.max_samples = max_samples
        self.step = -1
        self._records: list[dict] = []
        self._handles: list = []
        self._tensor_handles: list = []
        self._pending: dict[int, dict] = {}

    # ------------------------------------------------------------------ hooks
    def _on_model(self, module: nn.Module, args: tuple) -> None:
        self.step += 1

    def _recording(self) -> bool:
        return self.step >= 0 and self.step % self.every == 0

    def _pre(self, name: str):
        def hook(bn: nn.Module, args: tuple) -> None:
            if not self._recording() or not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            rec: dict = {"step": self.step, "layer": name, "training": bn.training,
                         "in": summary_stats(x, self.max_samples)}
            if bn.track_running_stats and bn.running_mean is not None and x.numel():
                mean, var = BF.batch_stats(x.detach())
                rv = bn.running_var.float() + bn.eps
                rec["drift_mean"] = float(((mean - bn.running_mean).abs() / rv.sqrt()).mean())
                rec["drift_var"] = float((var / rv).mean())
            self._pending[id(bn)] = rec
            if x.requires_grad:
                self._tensor_handles.append(x.register_hook(self._grad(rec, "grad_in_norm")))

        return hook

    def _post(self, bn: nn.Module, args: tuple, output) -> None:
        rec = self._pending.pop(id(bn), None)
        if rec is None:
            return
        rec["out"] = summary_stats(output, self.max_samples) if isinstance(output, Tensor) else {}
        rec["gamma"] = _param_stats(bn.weight)
        rec["beta"] = _param_stats(bn.bias)
        if isinstance(output, Tensor) and output.requires_grad:
            self._tensor_handles.append(output.register_hook(self._grad(rec, "grad_out_norm")))
        self._records.append(rec)

    @staticmethod
    def _grad(rec: dict, key: str):
        def hook(g: Tensor) -> None:  # returns None: the gradient is not changed
            rec[key] = float(g.detach().float().norm())

        return hook

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Monitor:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model))
        for name, bn in bn_layers(self.model):
            self._handles.append(bn.register_forward_pre_hook(self._pre(name)))
            self._handles.append(bn.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every module and tensor hook (called by ``__exit__``)."""
        for h in self._handles + self._tensor_handles:
            h.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._pending.clear()

    # ------------------------------------------------------------------ results
    def records(self) -> list[dict]:
        """Nested records, one per BN call: ``{step, layer, training, in, out, gamma, beta,
        drift_mean, drift_var, grad_in_norm, grad_out_norm}`` (keys absent when not known)."""
        return [dict(r) for r in self._records]

    def to_rows(self) -> list[dict]:
        """Flat records (``in_mean``, ``out_p85``, ``gamma_min``, ...) for a metrics file."""
        rows = []
        for r in self._records:
            row = {}
            for k, v in r.items():
                if isinstance(v, dict):
                    row.update({f"{k}_{kk}": vv for kk, vv in v.items()})
                else:
                    row[k] = v
            rows.append(row)
        return rows

    def plot(self, path: str | Path) -> Path:
        """Draw input/output percentiles, drift and gradient norms per layer over steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.to_rows()
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        if not layers:
            raise ValueError("Monitor.plot: nothing recorded; run the model inside the block")
        cols = (("in", "input percentiles"), ("out", "output percentiles"),
                ("drift", "running-stat drift"), ("grad", "gradient norm"))
        fig, axes = plt.subplots(len(layers), 4, figsize=(14, 2.4 * len(layers)), squeeze=False)
        for i, layer in enumerate(layers):
            lr = [r for r in rows if r["layer"] == layer]
            steps = [r["step"] for r in lr]
            for j, (key, title) in enumerate(cols):
                ax = axes[i][j]
                names = ([f"{key}_p{p}" for p in PERCENTILES] if key in ("in", "out") else
                         ["drift_mean", "drift_var"] if key == "drift" else
                         ["grad_in_norm", "grad_out_norm"])
                for n in names:
                    pts = [(s, r[n]) for s, r in zip(steps, lr, strict=True) if n in r]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), label=n.split("_", 1)[1], lw=1)
                ax.set_title(f"{layer}: {title}", fontsize=8)
                if key == "grad" and any("grad_in_norm" in r for r in lr):
                    ax.set_yscale("log")
                ax.legend(fontsize=6)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

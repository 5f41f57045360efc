"""One speedrun seed, in a process of its own: ``python -m bnlab.lab.speedrun.worker``.

The clock starts when the process does (interpreter start, imports, data loading and the
first steps' warm-up all count) and pauses while accuracy is measured: evaluation runs at
fixed steps and its time is left out of every reported second. The process prints one JSON
line, its result, as the last line of standard output.
"""

from __future__ import annotations

import time

_IMPORTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

__all__ = ["process_age", "run_seed", "main"]


def process_age() -> float:
    """Seconds since this process started, from ``/proc`` (Linux); elsewhere, since this
    module was imported (which then leaves the interpreter's start-up out)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def run_seed(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec["recipe"]`` with ``spec["seed"]`` until its steps are done or the clock
    reaches ``spec["budget_s"]`` (the learning rate follows whichever is nearer its end);
    measure accuracy at fixed steps on the test split (or on the holdout split: the last
    10,000 training images, with the first 50,000 to train on)."""
    origin = time.perf_counter() - process_age()  # clock 0 = process start

    import torch

    from ..data.datasets import batch_order, load_dataset
    from ..train.step import train_step
    from .recipe import Recipe, build_model, lr_at

    recipe = Recipe.from_dict(spec["recipe"])
    seed, budget = int(spec["seed"]), float(spec["budget_s"])
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(seed)
    excluded = 0.0

    def clock() -> float:
        return time.perf_counter() - origin - excluded

    ds = load_dataset("fashion-mnist", spec.get("data_dir"))
    x_train, y_train, x_eval, y_eval = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if spec["split"] == "holdout":
        x_eval, y_eval = x_train[50_000:], y_train[50_000:]
        x_train, y_train = x_train[:50_000], y_train[:50_000]
    if spec.get("train_subset"):
        x_train, y_train = x_train[: spec["train_subset"]], y_train[: spec["train_subset"]]
    if spec.get("eval_subset"):
        x_eval, y_eval = x_eval[: spec["eval_subset"]], y_eval[: spec["eval_subset"]]
    mean, std = x_train.mean(), x_train.std()
    x_train = (x_train - mean) / std
    x_eval = (x_eval - mean) / std
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    loaded_at = clock()

    model = build_model(recipe)
    decay = [p for p in model.parameters() if p.dim() > 1]
    other = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": other, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)
    n = len(x_train)
    per_epoch = n // recipe.batch_size
    if per_epoch < 1:
        raise ValueError(f"the training split has {n} images, fewer than one batch of "
                         f"{recipe.batch_size}")
    total = max(1, round(recipe.epochs * per_epoch))
    eval_every = max(1, per_epoch // recipe.evals_per_epoch)
    flips = torch.Generator().manual_seed(seed + 7_919)
    averaged = _Averaged(model, recipe.ema) if recipe.ema > 0 else None
    judged = averaged.model if averaged is not None else model
    evaluations: list[dict[str, Any]] = []

    @torch.no_grad()
    def evaluate(step: int, loss: float) -> None:
        nonlocal excluded
        t0 = time.perf_counter()
        at = clock()
        judged.eval()
        hits = 0
        for i in range(0, len(x_eval), 2000):
            xb = x_eval[i : i + 2000].contiguous(memory_format=fmt)
            hits += int((judged(xb).argmax(1) == y_eval[i : i + 2000]).sum())
        model.train()
        evaluations.append({"step": step, "epoch": round(step / per_epoch, 4),
                            "clock_s": round(at, 3), "accuracy": hits / len(x_eval),
                            "train_loss": loss})
        excluded += time.perf_counter() - t0

    step, epoch, stopped, loss = 0, 0, "schedule", float("nan")
    first_step_at = None
    while step < total and stopped == "schedule":
        for idx in batch_order(n, recipe.batch_size, seed, epoch):
            if len(idx) < recipe.batch_size:  # a fixed batch shape: the last short batch waits
                break
            xb = x_train[idx]
            if recipe.flip:
                mirror = torch.rand(len(idx), generator=flips) < 0.5
                xb = torch.where(mirror[:, None, None, None], xb.flip(3), xb)
            xb = xb.contiguous(memory_format=fmt)
            progress = max((step + 1) / total, clock() / budget)
            done = train_step(model, opt, xb, y_train[idx], lr=lr_at(recipe, progress),
                              label_smoothing=recipe.label_smoothing)
            if averaged is not None:
                averaged.update(step)
            step += 1
            if first_step_at is None:
                first_step_at = clock()
            end = step >= total or clock() >= budget
            if step % eval_every == 0 or end:
                loss = float(done.loss[0])
                if end and step < total:
                    stopped = "budget"
                evaluate(step, loss)
            if end:
                break
        epoch += 1
    return {
        "seed": seed, "norm": recipe.norm, "split": spec["split"], "stopped": stopped,
        "steps": step, "total_steps": total, "epochs": round(step / per_epoch, 4),
        "accuracy": evaluations[-1]["accuracy"], "clock_s": evaluations[-1]["clock_s"],
        "loaded_s": round(loaded_at, 3), "first_step_s": round(first_step_at or 0.0, 3),
        "eval_s_excluded": round(excluded, 3), "evaluations": evaluations,
        "train_images": n, "eval_images": len(x_eval),
    }


class _Averaged:
    """An exponential moving average of a model's floating-point parameters and buffers, kept
    in an evaluation-only copy (:attr:`model`)."""

    def __init__(self, model: Any, decay: float) -> None:
        import copy

        import torch

        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        live, mine = model.state_dict(), self.model.state_dict()
        keys = [k for k, v in live.items() if v.is_floating_point()]
        self._live = [live[k] for k in keys]
        self._mine = [mine[k] for k in keys]
        self._lerp = torch._foreach_lerp_

    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        self._lerp(self._mine, self._live, 1.0 - d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnlab.lab.speedrun.worker")
    p.add_argument("--spec", required=True, help="the seed's settings as JSON")
    args = p.parse_args(argv)
    result = run_seed(json.loads(args.spec))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

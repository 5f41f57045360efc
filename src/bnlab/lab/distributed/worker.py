"""The example DDP worker: ``python -m bnlab.lab.distributed.worker``.

Start it with torchrun (``bnlab.lab.distributed.launch(2, args=[...])``). It is a thin front
end of the lab's one DDP training entry, :func:`bnlab.lab.train.ddp.train_rank`: its flags
become a :class:`~bnlab.lab.train.TrainConfig` for the lab's small CNN
(:func:`bnlab.lab.models.small_cnn`) on Fashion-MNIST (or MNIST), and every rank trains it with
the trainer, one :func:`~bnlab.lab.train.step.train_step` per step. ``--steps`` steps of a
global batch of ``world_size * --batch-size`` images make one epoch over the first ``steps *
world_size * batch_size`` training images (SGD, momentum 0.9, constant ``--lr``); the running
statistics are averaged over the ranks and rank 0 evaluates on the first 1000 test images.

``--out`` becomes a run directory of the trainer (``config.toml``, ``environment.json``,
``steps.jsonl``, ``epochs.jsonl``, ``summary.json``, ``checkpoint.pt``; rank 0 writes it, and
refuses to write over an earlier run); ``--dump-states DIR`` makes every rank save its final
parameters and buffers as ``DIR/rank{R}.pt``. Each rank prints ``rank R pid P ...`` when it
starts and ``rank R step S of N`` after every step; rank 0 prints the summary at the end.

If another rank crashes or stops answering, the collective fails within ``--timeout``
seconds and this rank prints ``bnlab.lab.distributed.worker: rank R stopped ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bnlab.norms import norm_names

from .runtime import init_from_env, run_rank

__all__ = ["TEST_IMAGES", "example_config", "main"]

#: the test images rank 0 evaluates on at the end
TEST_IMAGES = 1000


def example_config(args: argparse.Namespace, world_size: int):
    """The :class:`~bnlab.lab.train.TrainConfig` the worker's flags describe on ``world_size``
    ranks; a ``--steps`` and ``--batch-size`` asking for more images than the training set
    holds is refused with the largest ``--steps`` that fits."""
    from ..data import SPECS
    from ..train.config import TrainConfig

    batch = world_size * args.batch_size
    have = SPECS[args.dataset].files["train_images"].shape[0]
    if args.steps * batch > have:
        raise ValueError(
            f"--steps {args.steps} of a global batch of {batch} ({world_size} ranks x "
            f"--batch-size {args.batch_size}) need {args.steps * batch} training images, but "
            f"{args.dataset} has {have}; use --steps {have // batch} or fewer"
        )
    return TrainConfig(
        model="small_cnn", norm=args.norm, dataset=args.dataset, data_dir=args.data_dir,
        train_subset=args.steps * batch, test_subset=TEST_IMAGES, epochs=1, batch_size=batch,
        optimizer="sgd", lr=args.lr, momentum=0.9, seed=args.seed,
        nproc_per_node=world_size, sync_bn=args.sync_bn, label=f"ddp-{args.norm}",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bnlab.lab.distributed.worker",
                                description="the example DDP worker: the lab's small CNN "
                                            "through the trainer, on every torchrun rank")
    p.add_argument("--out", required=True, help="the run directory (rank 0 writes it)")
    p.add_argument("--norm", default="bn", choices=norm_names())
    p.add_argument("--sync-bn", action="store_true", help="convert BN layers to SyncBatchNorm")
    p.add_argument("--steps", type=_positive, default=50, help="optimisation steps")
    p.add_argument("--batch-size", type=_positive, default=16,
                   help="images per rank per step (the global batch is world_size times this)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    p.add_argument("--data-dir", default="", help="searched first for the dataset's files")
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout (seconds)")
    p.add_argument("--dump-states", default=None,
                   help="folder for every rank's final parameters and buffers (rank{R}.pt)")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step (tests)")
    return p.parse_args(argv)


def _train(args: argparse.Namespace) -> None:
    from ..train.ddp import train_rank

    info = init_from_env(timeout_s=args.timeout)
    r = info.rank
    print(f"rank {r} pid {os.getpid()} world {info.world_size} backend {info.backend}",
          flush=True)
    config = example_config(args, info.world_size)

    def on_step(done: int) -> None:
        print(f"rank {r} step {done - 1} of {args.steps}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)

    summary = train_rank(info, config, args.out, quiet=True, dump_states=args.dump_states,
                         on_step=on_step)
    if info.is_main:
        print(json.dumps(summary, sort_keys=True), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_rank("bnlab.lab.distributed.worker", lambda: _train(args),
                    "\n(another rank crashed or stopped answering, or this rank failed)")


if __name__ == "__main__":
    sys.exit(main())

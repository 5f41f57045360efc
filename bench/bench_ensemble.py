"""Seeds trained together: time of S seeds packed into one network against one seed alone.

Claim checked: the studies' runner (``bnlab.lab.studies._fit.fit_seeds``) trains the five seeds of
one configuration at once for about the time of 2.5 seeds alone on the MLP and MNIST-1D
studies' networks (issue 16). For each study's network and training settings (optimiser,
batch size) it times ``fit_seeds`` with seeds ``0..S-1`` packed against seed 0 alone, in
alternating rounds, on random inputs of the study's shape (the arithmetic does not depend on
the values). A ratio of S means no gain; networks that cannot be packed (the transformer:
attention) train seed by seed and show about S. Packing is forced here; the studies' default
(``together="auto"``) trains 2-D CNNs seed by seed, because their packed ratio is above S.

Each timing is a whole ``fit_seeds`` call: building and packing the members, ``--steps``
training steps and the final evaluations. The default, 300 steps, is the shortest run any
study makes (``depth``, quick preset); the studies' runs are 300 to 50,000 steps long, and
the fixed costs weigh more the shorter the run (``--steps 60`` shows it).

Threads: the studies run with torch's default (every core; 2 here), where the packed
network's larger products use both cores and one seed's small ones barely do; ``--threads 1``
shows the ratio without that help. The result goes to ``bench/results/
bench_ensemble_threads<N>.json``.

    python bench/bench_ensemble.py [--seeds 5] [--steps 300] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _timing
from bnlab.lab.models import ioffe_mlp, mnist1d_cnn, mnist1d_mlp, small_cnn
from bnlab.lab.studies._fit import FitConfig, fit_seeds
from bnlab.lab.studies.beyond_images import SeqTransformer
from bnlab.lab.studies.depth import deep_mlp
from bnlab.lab.studies.regularization import make_model

IMAGE, SIGNAL = (1, 28, 28), (40,)

# name -> (study, network factory, input shape, batch size, optimiser, learning rate)
CASES = {
    "ioffe_mlp": ("ioffe-mnist", lambda: ioffe_mlp("bn"), IMAGE, 60, "sgd", 0.5),
    "deep_mlp 50 sigmoid": ("depth", lambda: deep_mlp(50, "sigmoid", True), IMAGE, 128, "sgd",
                            0.05),
    "mnist1d_mlp": ("beyond-images", lambda: mnist1d_mlp("bn"), SIGNAL, 100, "adam", 3e-3),
    "mnist1d_cnn": ("beyond-images", lambda: mnist1d_cnn("bn"), SIGNAL, 100, "adam", 3e-3),
    "transformer (seed by seed)": ("beyond-images", lambda: SeqTransformer("bn"), SIGNAL, 100,
                                   "adam", 3e-3),
    "small_cnn batch 8": ("batch-size", lambda: small_cnn("bn", "before"), IMAGE, 8, "adam", 1e-3),
    "small_cnn batch 64": ("learning-rate", lambda: small_cnn("bn", "before"), IMAGE, 64, "sgd",
                          0.1),
    "small_cnn batch 128": ("running-stats", lambda: small_cnn("bn"), IMAGE, 128, "adam", 1e-3),
    "regularization bn": ("regularization", lambda: make_model(True, None), IMAGE, 128, "adam",
                          1e-3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's default, as the studies run)")
    p.add_argument("--only", default=None, help="comma-separated case names")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = {}
    names = args.only.split(",") if args.only else list(CASES)
    for name in names:
        study, build, shape, batch, opt, lr = CASES[name]
        x = torch.randn(4000, *shape, generator=g)
        y = torch.randint(0, 10, (4000,), generator=g)
        xt, yt = x[:500], y[:500]
        cfg = FitConfig(steps=args.steps, batch_size=batch, lr=lr, optimizer=opt)

        def run(seeds, build=build, x=x, y=y, xt=xt, yt=yt, cfg=cfg):
            t0 = time.perf_counter()
            fit_seeds(build, seeds, x, y, xt, yt, cfg, eval_train=500, together=True)
            return time.perf_counter() - t0

        run([0])  # warm-up (allocator, kernels)
        together, alone = [], []
        for _ in range(args.rounds):
            together.append(run(list(range(args.seeds))))
            alone.append(run([0]))
        t, a = statistics.median(together), statistics.median(alone)
        rows[name] = {"study": study, "together_s": t, "alone_s": a, "ratio": t / a}
        print(f"{name:28s} {study:15s} {args.seeds} seeds together {t:7.2f} s, 1 seed alone "
              f"{a:6.2f} s: ratio {t / a:.2f} (seed by seed: {args.seeds})", flush=True)
    out = _timing.write_json(f"bench_ensemble_threads{torch.get_num_threads()}",
                             {"machine": _timing.machine(), "seeds": args.seeds,
                              "steps": args.steps, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

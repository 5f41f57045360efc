"""The small-CNN experiment side by side: Keras/TensorFlow (the tutorial's code) and bnlab.

Runs, in one session on the same machine and the same local Fashion-MNIST files, the tutorial's
Keras CNN (``bench/seed_keras.py``, with and without BN) and bnlab's PyTorch version
(``bnlab run small-cnn --norms none,bn``), alternating, and prints seconds per epoch (median over
epochs, the first epoch excluded when there are more than two) and validation accuracy.
Not part of CI. TensorFlow lives in its own environment::

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    python bench/bench_seed_peer.py --tf-python /tmp/tfvenv/bin/python --epochs 10

With ``--speedrun RUN_DIR`` (a ``bnlab speedrun`` run directory) it also checks the speedrun's
floor: the median BN seed must reach the accuracy the tutorial's Keras network reaches after
its 10 epochs (0.893 in the issue; ``--floor-accuracy``) in at most a tenth of the Keras
run's time measured here, today (the sum of its epoch times, which leaves Keras's own start-up
out while the speedrun's seconds count from its process start). ``--skip-bnlab`` runs only the
Keras side; ``--keras-from JSON`` takes the Keras runs from an earlier result of the same day
(a speedrun run directory checked against the Keras run it was measured beside). The numbers
go to ``bench/results/bench_seed_peer.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _median_epoch(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 2 else times)


def run_keras(tf_python: str, norm: str, args) -> dict:
    cmd = [tf_python, str(ROOT / "bench/seed_keras.py"), "--epochs", str(args.epochs),
           "--threads", str(args.threads), "--data-dir", args.data_dir,
           "--train-subset", str(args.train_subset)] + (["--no-bn"] if norm == "none" else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"seed_keras.py failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"who": "keras (tutorial)", "norm": norm, "times": r["epoch_times"],
            "val_acc": r["val_acc"], "version": r["framework"]}


def run_bnlab(norm: str, args, out_dir: Path) -> dict:
    run = out_dir / f"bnlab-{norm}"
    cmd = [sys.executable, "-m", "bnlab", "run", "small-cnn", "--dataset", "fashion-mnist",
           "--norms", norm, "--seeds", "1", "--epochs", str(args.epochs), "--threads",
           str(args.threads), "--data-dir", args.data_dir, "--train-subset",
           str(args.train_subset), "--out", str(run), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"bnlab run small-cnn failed:\n{out.stderr[-3000:]}")
    epochs = [json.loads(line) for line in
              (run / "runs" / f"{norm}-s0" / "epochs.jsonl").read_text().splitlines()]
    import torch

    return {"who": "bnlab (torch)", "norm": norm, "times": [e["epoch_time"] for e in epochs],
            "val_acc": [e["val_acc"] for e in epochs], "version": f"torch {torch.__version__}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tf-python", default="/tmp/tfvenv/bin/python")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--norms", default="bn,none")
    ap.add_argument("--speedrun", help="a bnlab speedrun run directory to hold to the floor")
    ap.add_argument("--floor-accuracy", type=float, default=0.893)
    ap.add_argument("--skip-bnlab", action="store_true", help="run only the Keras side")
    ap.add_argument("--keras-from", metavar="JSON",
                    help="take the Keras runs from an earlier bench_seed_peer.json of the same "
                         "day instead of running Keras again (the floor's reference)")
    args = ap.parse_args()
    results = []
    today = datetime.date.today().isoformat()
    if args.keras_from:
        src = Path(args.keras_from)
        old = json.loads(src.read_text())
        day = old.get("date") or datetime.date.fromtimestamp(src.stat().st_mtime).isoformat()
        if day != today:
            sys.exit(f"--keras-from: {src} was measured on {day}, not today ({today}); the floor "
                     "compares with a Keras run of the same day")
        results = [r for r in old["runs"] if r["who"].startswith("keras")
                   and r["norm"] in args.norms.split(",")]
        if not results:
            sys.exit(f"--keras-from: {src} holds no Keras run for --norms {args.norms}")
    with tempfile.TemporaryDirectory() as tmp:
        for norm in args.norms.split(","):
            if not args.keras_from:
                results.append(run_keras(args.tf_python, norm, args))
            if not args.skip_bnlab:
                results.append(run_bnlab(norm, args, Path(tmp)))
    print(f"\nsmall CNN on Fashion-MNIST, {args.epochs} epochs, batch 128, Adam, "
          f"{args.threads} threads, train subset {args.train_subset or 'all'}")
    print(f"{'who':14s} {'norm':5s} {'s/epoch':>8s} {'final val':>9s} {'best val':>9s}  version")
    for r in results:
        print(f"{r['who']:14s} {r['norm']:5s} {_median_epoch(r['times']):8.2f} "
              f"{r['val_acc'][-1]:9.4f} {max(r['val_acc']):9.4f}  {r['version']}")
    for norm in args.norms.split(","):
        k = next(r for r in results if r["norm"] == norm and r["who"].startswith("keras"))
        b = next((r for r in results if r["norm"] == norm and r["who"].startswith("bnlab")),
                 None)
        print(f"keras {norm}: {len(k['times'])} epochs in {sum(k['times']):.1f} s, final val "
              f"accuracy {k['val_acc'][-1]:.4f}")
        if b is not None:
            print(f"{norm}: keras / bnlab time per epoch = "
                  f"{_median_epoch(k['times']) / _median_epoch(b['times']):.2f}x")
    payload = {"date": today, "epochs": args.epochs, "threads": args.threads, "runs": results}
    if args.speedrun:
        keras = next(r for r in results if r["norm"] == "bn" and r["who"].startswith("keras"))
        payload["floor"] = floor(Path(args.speedrun), sum(keras["times"]), args.floor_accuracy)
        f = payload["floor"]
        print(f"floor: median BN speedrun seed reaches {f['accuracy']} at "
              f"{f['median_s']} s (per seed {f['per_seed_s']}); a tenth of the Keras run "
              f"({f['keras_s']:.1f} s) is {f['limit_s']:.1f} s: "
              f"{'holds' if f['holds'] else 'does not hold'}")
    out = ROOT / "bench" / "results" / "bench_seed_peer.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


def floor(run_dir: Path, keras_s: float, accuracy: float) -> dict:
    """Median over BN seeds of the first evaluation clock at or above ``accuracy``."""
    rows = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    per_seed = []
    for seed in sorted({r["seed"] for r in rows if r["norm"] == "bn"}):
        hits = [r["clock_s"] for r in rows
                if r["norm"] == "bn" and r["seed"] == seed and r["accuracy"] >= accuracy]
        per_seed.append(hits[0] if hits else None)
    reached = sorted(v for v in per_seed if v is not None)
    median = (statistics.median(reached + [float("inf")] * (len(per_seed) - len(reached)))
              if per_seed else None)
    limit = keras_s / 10
    return {"accuracy": accuracy, "per_seed_s": per_seed, "median_s": median,
            "keras_s": keras_s, "limit_s": limit,
            "holds": median is not None and median <= limit, "run": str(run_dir)}


if __name__ == "__main__":
    main()

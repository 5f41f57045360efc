"""Corruption benchmark on Fashion-MNIST: source vs AdaBN vs TENT.

See bnlab.lab.studies.corruption_benchmark.

Usage: python bench/bench_shift.py [--out runs/shift] [--train-size 60000] [--epochs 2]
"""

from __future__ import annotations

import sys

from bnlab.lab.studies.corruption_benchmark import main

if __name__ == "__main__":
    sys.exit(main())

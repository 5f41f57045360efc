"""``bnlab speedrun``: time to accuracy on Fashion-MNIST, with BN and without.

:func:`speedrun` trains a recipe (:mod:`bnlab.lab.speedrun.recipe`) once per seed, each seed
in a fresh process (:mod:`bnlab.lab.speedrun.worker`) so that every second from the process's
start counts, against a wall-clock budget; it records the time at which each target accuracy
was first reached and, when both recipes ran, judges the tutorial's claim that BN makes
training faster with the studies' verdict rule.
"""

from .recipe import RECIPES, Recipe, build_model, lr_at
from .run import TARGETS, speedrun

__all__ = ["RECIPES", "Recipe", "TARGETS", "build_model", "lr_at", "speedrun"]

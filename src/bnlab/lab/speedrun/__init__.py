"""``bnlab speedrun``: time to accuracy on Fashion-MNIST, with BN and without.

:func:`speedrun` trains a recipe (:mod:`bnlab.lab.speedrun.recipe`) once per seed, each seed
in a fresh process (:mod:`bnlab.lab.speedrun.worker`) so that every second from the process's
start counts, against a wall-clock budget; it records the time at which each target accuracy
was first reached and, when both recipes ran, judges the tutorial's claim that BN makes
training faster with the studies' verdict rule.
"""

from .recipe import RECIPES, Recipe, build_model, lr_at

__all__ = ["RECIPES", "Recipe", "TARGETS", "build_model", "lr_at", "speedrun"]


def __getattr__(name: str):
    # the runner (and through it the studies' report and matplotlib, 0.3 s) loads on first
    # use: a seed's worker process imports only the recipe, and its clock counts imports
    if name in ("TARGETS", "speedrun"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The lab: the experiments built on the bnlab library.

The trainer and run directories (:mod:`bnlab.lab.train`), the studies of the tutorial's claims
(:mod:`bnlab.lab.studies`), reports (:mod:`bnlab.lab.report`), datasets and models
(:mod:`bnlab.lab.data`, :mod:`bnlab.lab.models`), the torchrun launch
(:mod:`bnlab.lab.distributed`) and the ``bnlab`` command (:mod:`bnlab.lab.cli`,
:mod:`bnlab.lab.commands`).

The lab imports the library (``import bnlab``); the library never imports the lab, so
``import bnlab`` stays the layers, the functional core, the kernels, the converters and the
tools. ``make test`` enforces this with import-linter (contracts in ``pyproject.toml``).
"""

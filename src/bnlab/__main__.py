"""``python -m bnlab`` is the ``bnlab`` command (which lives in the lab, :mod:`bnlab.lab`)."""

import sys

from bnlab.lab.cli import main

sys.exit(main())

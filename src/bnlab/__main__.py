"""``python -m bnlab`` is the ``bnlab`` command."""

import sys

from .cli import main

sys.exit(main())

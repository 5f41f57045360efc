"""Subcommands of the ``bnlab`` command line, one module each."""

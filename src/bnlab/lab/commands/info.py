"""``bnlab info``: versions, threads and which kernel backend is active."""

from __future__ import annotations

import argparse
import json
import platform


def environment() -> dict:
    """Versions and machine facts recorded with every run and benchmark."""
    import torch

    from bnlab import __version__

    info = {
        "bnlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from bnlab.kernels import backend, native_error

        info["kernel_backend"] = backend()
        if native_error() is not None:  # why the native kernels are missing
            info["native_kernels_error"] = native_error()
    except ImportError:
        info["kernel_backend"] = "torch"
    return info


def _run(args: argparse.Namespace) -> int:
    print(json.dumps(environment(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print versions, threads and the kernel backend")
    p.set_defaults(func=_run)

"""Build bnlab's compiled kernels (``bnlab.kernels._native``) with setuptools.

Everything else about the package is declared in ``pyproject.toml``. The extension is a plain
CPython module (no torch headers): it is compiled with ``-O3`` (auto-vectorised for the
baseline instruction set of the platform, no ``-march=native``) and OpenMP. If the compiler
lacks OpenMP it is built single-threaded; if it cannot be built at all the install still
succeeds and bnlab runs on its pure-PyTorch path (``bnlab.kernels.backend()`` says which).
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_OPENMP = ["-fopenmp"]


class BuildExt(build_ext):
    """Retry without OpenMP when the compiler rejects it, and never fail the install."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
            return
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back
            print(f"bnlab: building {ext.name} with OpenMP failed ({exc}); retrying without it",
                  file=sys.stderr)
        ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in _OPENMP]
        ext.extra_link_args = [a for a in ext.extra_link_args if a not in _OPENMP]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"bnlab: could not build {ext.name} ({exc}); the pure-PyTorch kernels will be "
                  "used", file=sys.stderr)


_unix = sys.platform != "win32"
native = Extension(
    "bnlab.kernels._native",
    sources=["csrc/bnlab_kernels.c"],
    depends=["csrc/bn_impl.h", "csrc/bn_impl_bwd.h", "csrc/bn_drivers.h", "csrc/bn_buffers.h",
             "csrc/bn_instance.h"],
    extra_compile_args=(["-O3", "-std=c11", "-fno-math-errno", "-Wno-psabi", *_OPENMP] if _unix else ["/O2",
                                                                                       "/openmp"]),
    extra_link_args=_OPENMP if _unix else [],
)

setup(ext_modules=[native], cmdclass={"build_ext": BuildExt})

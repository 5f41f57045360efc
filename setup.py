"""Build bnlab's compiled kernels (``bnlab.kernels._native``) with setuptools.

Everything else about the package is declared in ``pyproject.toml``. The extension is one
shared object of two parts: the C kernels (``csrc/bnlab_kernels.c``, ``-O3``, auto-vectorised
for the baseline instruction set, no ``-march=native``, OpenMP; also a tiny CPython module of
knobs) and the torch operators over them (``csrc/bnlab_ops.cpp``, built against torch's stable
ABI headers of the torch installed beside the build: ``torch.ops.bnlab.*``). If the compiler
lacks OpenMP it is built single-threaded; if it cannot be built at all the install still
succeeds and bnlab runs on its pure-PyTorch path (``bnlab.kernels.backend()`` says which).
``BNLAB_REQUIRE_NATIVE=1`` makes that case fail the install instead.

On CPython 3.11 and later the extension uses only the limited C API of 3.11
(``Py_LIMITED_API=0x030B0000``), so ``bdist_wheel`` makes one ``cp311-abi3`` wheel for every
CPython from 3.11 on (``make wheel``); on 3.10 a source build makes an ordinary
version-specific extension.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_OPENMP = ["-fopenmp"]
# The C++ operator layer (csrc/bnlab_ops.cpp) targets torch's stable ABI as of torch 2.11 (the
# first with from_blob + deleter): the shared object then loads on torch 2.11 and every later
# release without a rebuild. Older torch gets bnlab's pure-PyTorch path.
_TORCH_TARGET = "0x020b000000000000"
_C_FLAGS = ["-O3", "-fno-math-errno", "-Wno-psabi"]
_CXX_FLAGS = ["-O2", "-std=c++17", f"-DTORCH_TARGET_VERSION={_TORCH_TARGET}"]
# Written next to the extension when it could not be built, so that bnlab can say why at first
# use (pip shows a build's output only with -v or when the build fails).
_MISSING_NOTE = "_native_build_error.txt"
_LIMITED_API = sys.version_info >= (3, 11) and sys.implementation.name == "cpython"


def _torch_paths() -> tuple[list[str], list[str]]:
    """torch's header and library folders, from the torch this build runs beside (the operators
    are compiled against its stable-ABI headers and link its libtorch_cpu)."""
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError("torch must be importable while bnlab's kernels are built (install "
                           "torch first and use `pip install --no-build-isolation`)") from exc
    root = Path(torch.__file__).parent
    return [str(root / "include")], [str(root / "lib")]


class BuildExt(build_ext):
    """Retry without OpenMP when the compiler rejects it, and never fail the install (unless
    BNLAB_REQUIRE_NATIVE is set): record why instead, for bnlab to say at first use.

    C and C++ sources get their own flags (setuptools passes one list to both)."""

    def build_extensions(self) -> None:
        original = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            flags = _CXX_FLAGS if src.endswith(".cpp") else _C_FLAGS
            original(obj, src, ext, cc_args, [*extra_postargs, *flags], pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        try:
            includes, libs = _torch_paths()
        except RuntimeError as exc:
            includes, libs = [], []
            self._torch_missing = exc
        ext.include_dirs = [*ext.include_dirs, *includes]
        ext.library_dirs = [*ext.library_dirs, *libs]
        target = Path(self.get_ext_fullpath(ext.name))
        note = target.with_name(_MISSING_NOTE)
        note.unlink(missing_ok=True)
        try:
            if getattr(self, "_torch_missing", None) is not None:
                raise self._torch_missing
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
            reason = f"{type(exc).__name__}: {exc}"
            if os.environ.get("BNLAB_REQUIRE_NATIVE", "") not in ("", "0"):
                raise RuntimeError(f"bnlab: could not build {ext.name} ({reason}) and "
                                   "BNLAB_REQUIRE_NATIVE is set") from exc
            target.unlink(missing_ok=True)  # a build of older sources
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(reason + "\n")
            ext.optional = True  # so that --inplace has nothing to copy rather than failing
            print(f"WARNING: bnlab: could not build {ext.name} ({reason}); bnlab will run on "
                  "the slower pure-PyTorch kernels. Install a C compiler and reinstall with "
                  "`pip install --force-reinstall --no-cache-dir` (pip caches this build), or "
                  "install bnlab's prebuilt wheel.", file=sys.stderr)

    def copy_extensions_to_source(self) -> None:
        """``--inplace`` (and editable installs): setuptools builds under ``build/`` and copies
        the extension into ``src/``. Also remove builds there of another ABI tag (an older
        ``_native.cpython-311-*.so`` is imported before ``_native.abi3.so``) or of older
        sources when this build failed, and carry the note of the failure along."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace, regular = (Path(p) for p in self._get_inplace_equivalent(build_py, ext))
            stem = inplace.name.split(".")[0]
            for old in inplace.parent.glob(f"{stem}.*"):
                if old.suffix in (".so", ".pyd") and (old != inplace or not regular.exists()):
                    old.unlink()
            note = inplace.with_name(_MISSING_NOTE)
            note.unlink(missing_ok=True)
            if regular.with_name(_MISSING_NOTE).exists():
                shutil.copyfile(regular.with_name(_MISSING_NOTE), note)
        super().copy_extensions_to_source()


_unix = sys.platform != "win32"
native = Extension(
    "bnlab.kernels._native",
    sources=["csrc/bnlab_kernels.c", "csrc/bnlab_ops.cpp"],
    depends=["csrc/bn_impl.h", "csrc/bn_impl_bwd.h", "csrc/bn_drivers.h", "csrc/bn_buffers.h",
             "csrc/bn_bf16.h",
             "csrc/bn_instance.h", "csrc/bn_masked.h"],
    extra_compile_args=[*_OPENMP] if _unix else ["/O2", "/openmp"],
    libraries=["torch_cpu", "c10"] + (["stdc++"] if _unix else []),
    extra_link_args=_OPENMP if _unix else [],
    define_macros=[("Py_LIMITED_API", "0x030B0000")] if _LIMITED_API else [],
    py_limited_api=_LIMITED_API,
)

setup(
    ext_modules=[native],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if _LIMITED_API else {},
)

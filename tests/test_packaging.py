"""What the wheel promises (issue 15, packaging): bnlab's types are visible to type checkers,
the extension is built against the stable ABI, and a missing extension says why."""

import sys
from importlib import resources
from pathlib import Path

import pytest

from bnlab import kernels


def test_py_typed_is_in_the_package_and_declared_as_package_data():
    assert resources.files("bnlab").joinpath("py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["bnlab"]


@pytest.mark.skipif(not kernels.native_available(), reason="native kernels not built")
@pytest.mark.skipif(sys.platform != "linux", reason="extension file names differ")
def test_extension_is_built_against_the_stable_abi():
    # setup.py defines Py_LIMITED_API for CPython 3.11+; setuptools then names the file .abi3.so
    # (an older build of another ABI tag left next to it would be imported first)
    assert Path(kernels._native.__file__).name == "_native.abi3.so"


def test_missing_extension_reason(tmp_path):
    err = ModuleNotFoundError("No module named 'bnlab.kernels._native'")
    assert "was not built" in kernels._ops._missing_reason(err, str(tmp_path))
    (tmp_path / "_native_build_error.txt").write_text("CompileError: no cc\n")
    assert kernels._ops._missing_reason(err, str(tmp_path)) == (
        "not built when bnlab was installed: CompileError: no cc"
    )
    (tmp_path / "_native.cpython-39-x86_64-linux-gnu.so").touch()  # built for another Python
    assert kernels._ops._missing_reason(err, str(tmp_path)).startswith("ModuleNotFoundError")

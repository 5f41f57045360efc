"""The library (``src/bnlab``) and the lab (``src/bnlab/lab``) stay apart.

import-linter (``make test``) checks the contracts in ``pyproject.toml``; these tests check
what it cannot: that the contract names every library module, so a new one is not left out,
and that ``import bnlab`` loads nothing of the lab.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

import bnlab

ROOT = Path(__file__).resolve().parents[1]
PKG = Path(bnlab.__file__).parent


def _contract(name: str) -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["name"] == name)


def test_library_contract_names_every_library_module():
    contract = _contract("the library imports nothing from the lab")
    assert contract["forbidden_modules"] == ["bnlab.lab"]
    library = {f"bnlab.{p.stem}" if p.is_file() else f"bnlab.{p.name}"
               for p in PKG.iterdir()
               if (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
               or (p.is_dir() and (p / "__init__.py").exists() and p.name != "lab")}
    assert library - set(contract["source_modules"]) == set()
    assert "bnlab.lab" not in contract["source_modules"]


def test_the_lab_holds_the_experiments():
    lab = {p.name for p in (PKG / "lab").iterdir() if not p.name.startswith("__")}
    assert {"cli.py", "commands", "data", "distributed", "models", "report", "studies",
            "train"} <= lab
    assert not any((PKG / name).exists() for name in ("cli.py", "commands", "studies", "train"))


def test_import_bnlab_loads_nothing_of_the_lab():
    code = ("import sys, bnlab, bnlab.tools, bnlab.keras, bnlab.convert\n"
            "print(sorted(m for m in sys.modules if m.startswith('bnlab.lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_python_m_bnlab_is_the_command():
    out = subprocess.run([sys.executable, "-m", "bnlab", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("bnlab ") and bnlab.__version__ in out

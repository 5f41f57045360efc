import json
import subprocess
import sys

from bnlab.lab.cli import main


def test_info_prints_versions(capsys) -> None:
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"].startswith("2.")
    assert info["kernel_backend"] in ("native", "torch")


def test_no_command_prints_help_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "usage: bnlab" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "bnlab", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("bnlab ")

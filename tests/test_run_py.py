"""run.py in a temporary copy of the project: a half-made .venv is rebuilt, and
a Python without venv support gets told what to install.

No package index is used: ``PIP_NO_INDEX`` makes the install step fail at
once after the rebuild, which is the part under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


def _copy(tmp_path: Path) -> Path:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("run.py", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    return work


def _base_python() -> str:
    """A Python outside any venv, as a fresh machine has (the venv's own has no ensurepip)."""
    return os.path.join(sys.base_prefix, "bin", f"python3.{sys.version_info.minor}")


def _offline() -> dict[str, str]:
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PYTHONDONTWRITEBYTECODE": "1"}


def test_half_made_venv_is_made_again(tmp_path: Path) -> None:
    work = _copy(tmp_path)
    python = _base_python()
    if subprocess.run([python, "-c", "import ensurepip"], capture_output=True).returncode:
        pytest.skip("this Python has no ensurepip (python3-venv missing here)")
    # What `python3 -m venv .venv` leaves behind when python3-venv is missing.
    subprocess.run([python, "-m", "venv", "--without-pip", str(work / ".venv")], check=True)
    pip_check = [str(work / ".venv/bin/python"), "-m", "pip", "--version"]
    assert subprocess.run(pip_check, capture_output=True).returncode != 0

    done = subprocess.run(
        [python, "run.py", "pytest", "--co"],
        cwd=work,
        capture_output=True,
        text=True,
        env=_offline(),
        timeout=300,
    )
    assert ".venv is half-made" in done.stderr
    assert "python3-venv" in done.stderr
    assert subprocess.run(pip_check, capture_output=True).returncode == 0  # rebuilt, with pip
    # The offline install then fails, and says so without a traceback.
    assert done.returncode != 0
    assert "pip could not install the project" in done.stderr
    assert "Traceback" not in done.stderr


def test_python_without_venv_support_is_told_what_to_install(tmp_path: Path) -> None:
    work = _copy(tmp_path)
    # ensurepip hidden, as on Debian without python3-venv.
    code = (
        "import sys, runpy; sys.modules['ensurepip'] = None; "
        "sys.argv = ['run.py', 'pytest']; runpy.run_path('run.py', run_name='__main__')"
    )
    done = subprocess.run(
        [_base_python(), "-c", code],
        cwd=work,
        capture_output=True,
        text=True,
        env=_offline(),
        timeout=60,
    )
    assert done.returncode == 1
    assert "sudo apt install python3-venv" in done.stderr
    assert not (work / ".venv").exists()  # nothing half-made left behind

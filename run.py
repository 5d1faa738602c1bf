#!/usr/bin/env python3
"""Run a project command inside the project's own virtualenv, creating it first if needed.

    python3 run.py registry serve     # the registry on its embedded defaults
    python3 run.py pytest             # the whole test suite

Stdlib only, so it works on a fresh machine with nothing but Python >= 3.11:
it makes ``.venv`` beside this file, installs the project with its test extras
(again whenever pyproject.toml changes), then replaces itself with the command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".callback-lab-installed"


def _wanted() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def _venv_help() -> str:
    v = f"python3.{sys.version_info.minor}"
    return (
        f"run.py: this Python cannot make a virtualenv with pip in it. Install the venv "
        f"support, then run the same command again:\n"
        f"    sudo apt install python3-venv {v}-venv      # Debian, Ubuntu\n"
        f"    sudo dnf install python3                    # Fedora (venv is included)"
    )


def _has_pip() -> bool:
    python = BIN / "python"
    if not python.exists():  # also a dangling link, after the system Python moved on
        return False
    probe = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True)
    return probe.returncode == 0


def _make_venv() -> None:
    # Checked first: without ensurepip, venv stops half-way and leaves a .venv with no pip.
    if importlib.util.find_spec("ensurepip") is None:
        sys.exit(_venv_help())
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(VENV, ignore_errors=True)  # leave nothing half-made behind
        sys.exit(f"{_venv_help()}\n(creating .venv failed: {exc})")


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py may be started by any python3
        sys.exit(f"run.py: Python >= 3.11 is required, this is {sys.version.split()[0]}")
    if STAMP.exists() and STAMP.read_text() == _wanted() and (BIN / "python").exists():
        return
    if not VENV.exists():
        print("run.py: creating .venv ...", file=sys.stderr)
        _make_venv()
    elif not _has_pip():
        print(
            "run.py: .venv is half-made (no working python or pip in it: made while "
            "python3-venv was missing, or by a Python that has since gone): making it again ...",
            file=sys.stderr,
        )
        _make_venv()
    print("run.py: installing callback-lab and its test tools into .venv ...", file=sys.stderr)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if subprocess.run([*pip, "-e", f"{ROOT}[test]"]).returncode != 0:
        sys.exit("run.py: pip could not install the project (its message is above)")
    STAMP.write_text(_wanted())


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    ensure_venv()
    cmd, args = sys.argv[1], sys.argv[2:]
    exe = BIN / cmd
    if not exe.exists():
        sys.exit(f"run.py: no command {cmd!r} in .venv (try: registry, student, pytest)")
    os.chdir(ROOT) if cmd == "pytest" else None
    os.execv(str(exe), [str(exe), *args])


if __name__ == "__main__":
    main()

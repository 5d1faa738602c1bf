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
import os
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


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py may be started by any python3
        sys.exit(f"run.py: Python >= 3.11 is required, this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print("run.py: creating .venv ...", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _wanted():
        return
    print("run.py: installing callback-lab and its test tools into .venv ...", file=sys.stderr)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
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

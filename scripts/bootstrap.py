"""Set up maskc in ./.venv on a fresh machine: `python3 scripts/bootstrap.py [--test]`.

Keeps an existing torch (from the interpreter running this script, or in an
existing .venv); otherwise installs the pinned CPU build, so that no multi-GB
CUDA build is pulled by accident.  Set MASKC_TORCH to change what is installed
(for example "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
Safe to run again: each step is skipped when already done.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PINNED_TORCH = "torch==2.13.0"


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def has_module(python: Path | str, module: str) -> bool:
    probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--test", action="store_true", help="also install the test tools (pytest, hypothesis, triton, ruff)"
    )
    args = parser.parse_args()
    if sys.version_info < (3, 10):  # noqa: UP036 - say so clearly on an old interpreter
        sys.exit(f"maskc needs Python >= 3.10; this is {sys.version.split()[0]}")
    python = VENV / "bin" / "python"
    if not python.exists():
        # See the system's torch from the venv, if there is one, rather than installing another.
        system_torch = has_module(sys.executable, "torch")
        print(f"+ creating {VENV} (system site-packages: {system_torch})", flush=True)
        venv.EnvBuilder(with_pip=True, system_site_packages=system_torch).create(VENV)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if not has_module(python, "torch"):
        run(*pip, *shlex.split(os.environ.get("MASKC_TORCH", PINNED_TORCH)))
    target = f"{ROOT}[test]" if args.test else str(ROOT)
    run(*pip, "-e", target)
    print(f"maskc is ready: {VENV}/bin/maskc", flush=True)


if __name__ == "__main__":
    main()

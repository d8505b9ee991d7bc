"""Prints the path of a working Python interpreter of the version asked for, or of this one.

    python3 tools/find_python.py 3.12

Tries ``python3.12`` on PATH (a pyenv shim there may exist and still fail, so each candidate is
run), then pyenv's installed versions; falls back to the interpreter running this script, with a
warning on stderr, so that `make test-compat` still runs where that Python is not installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys


def works(python: str, version: str) -> bool:
    code = "import sys, venv; print('%d.%d' % sys.version_info[:2])"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def candidates(version: str) -> list[str]:
    found = [shutil.which(f"python{version}") or ""]
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    for root in filter(None, roots):
        found += sorted(
            glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}"))
        )
    return [c for c in found if c]


def find_python(version: str) -> str:
    """A working interpreter of ``version`` (as "3.12"), else ``sys.executable``."""
    for python in candidates(version):
        if works(python, version):
            return python
    print(f"find_python: no Python {version} here; using {sys.version.split()[0]}", file=sys.stderr)
    return sys.executable


if __name__ == "__main__":
    print(find_python(sys.argv[1] if len(sys.argv) > 1 else "%d.%d" % sys.version_info[:2]))

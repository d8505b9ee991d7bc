"""Writes the lock files that `make` installs from: exact versions of everything.

The requirements themselves are written once, in pyproject.toml (``[build-system] requires``,
``[project] dependencies`` and every optional-dependency group). This script resolves them in a
scratch virtual environment with pip, as a user's ``pip install`` would, and freezes the result:

    python tools/lock.py default   # -> requirements.lock         (newest versions pip accepts here)
    python tools/lock.py compat    # -> requirements-compat.lock  (the oldest supported set)

``make lock`` runs both. The compat set is the floor of pyproject.toml's ranges: the torch and
triton the GPU machines run, on the Python given by ``--python`` (default: python3.12 when present).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

COMPAT_PYTHON = "3.12"  # the GPU machines' Python

# Extra constraints per lock, on top of pyproject.toml's ranges.
LOCKS: dict[str, dict] = {
    "default": {"file": "requirements.lock", "pins": []},
    "compat": {
        "file": "requirements-compat.lock",
        # The oldest supported torch and triton (pyproject.toml's lower bounds); triton 3.6's
        # interpreter breaks on numpy >= 2.4 (a 1-element array where it wants a scalar).
        "pins": ["torch==2.11.*", "triton==3.6.*", "numpy<2.4"],
    },
}


def requirements() -> list[str]:
    """Every requirement pyproject.toml names (build, runtime, every extra), in file order."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(meta["build-system"]["requires"]) + list(meta["project"]["dependencies"])
    for group in meta["project"].get("optional-dependencies", {}).values():
        reqs += group
    seen: set[str] = set()
    return [r for r in reqs if not (r in seen or seen.add(r))]


def default_python(name: str) -> str:
    if name == "compat":
        sys.path.insert(0, str(ROOT / "tools"))
        from find_python import find_python

        return find_python(COMPAT_PYTHON)
    return sys.executable


def run(cmd: list[str]) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("name", choices=sorted(LOCKS))
    parser.add_argument("--python", help="interpreter to resolve for (default: see above)")
    args = parser.parse_args()
    lock = LOCKS[args.name]
    python = args.python or default_python(args.name)
    with tempfile.TemporaryDirectory(prefix=f"softmax-ext-lock-{args.name}-") as tmp:
        venv = Path(tmp) / "venv"
        run([python, "-m", "venv", str(venv)])
        py = str(venv / "bin" / "python")
        run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip", "setuptools", "wheel"])
        pins = Path(tmp) / "pins.txt"
        pins.write_text("".join(p + "\n" for p in lock["pins"]))
        run([py, "-m", "pip", "install", "--quiet", "-c", str(pins), *requirements()])
        frozen = run([py, "-m", "pip", "freeze", "--all"])
        version = run([py, "-c", "import platform; print(platform.python_version())"]).strip()
    header = (
        f"# Exact versions `make` installs ({args.name} set): written by `python tools/lock.py "
        f"{args.name}`\n# (or `make lock`) from pyproject.toml on {datetime.date.today()}, "
        f"Python {version}. Do not edit by hand.\n"
    )
    lines = sorted(ln for ln in frozen.splitlines() if ln and not ln.startswith("-e "))
    (ROOT / lock["file"]).write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {lock['file']} ({len(lines)} packages)")


if __name__ == "__main__":
    main()

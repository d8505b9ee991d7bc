"""Compiler and linker flags for the C++ extension, shared by setup.py and the JIT fallback."""

from __future__ import annotations

import sys


def cxx_flags() -> list[str]:
    """-O3 and OpenMP: without -fopenmp at compile and link, at::parallel_for runs on one thread."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"]
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-strict-aliasing"]
    if sys.platform == "darwin":
        flags = ["-O3", "-Xpreprocessor", "-fopenmp"]
    return flags


def link_flags() -> list[str]:
    if sys.platform == "win32":
        return []
    return ["-fopenmp"] if sys.platform != "darwin" else ["-lomp"]

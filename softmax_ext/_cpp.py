"""Finding and loading the compiled C++ extension (``softmax_ext._C``).

setup.py builds ``softmax_ext._C`` ahead of time. Only when that module is missing (a source
checkout nobody built) do we JIT-compile csrc/ with torch.utils.cpp_extension.load; never both,
since two registrations of the same torch.library kernels abort the process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_loaded = False
_module = None  # the extension module: softmax_ext._C, or the JIT-built one


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    csrc = Path(__file__).resolve().parent.parent / "csrc"
    sources = sorted(str(p) for p in csrc.glob("*.cpp"))
    if not sources:
        raise ImportError(
            "softmax_ext._C is not built and csrc/ is not beside the package; "
            "run `pip install --no-build-isolation -e .` (or `make install`)"
        )
    from ._build_flags import cxx_flags, link_flags

    print("softmax_ext: compiling the C++ extension (first use only)...", file=sys.stderr)
    global _module
    _module = load(
        name="softmax_ext_C",
        sources=sources,
        extra_cflags=cxx_flags(),
        extra_ldflags=link_flags(),
        extra_include_paths=[str(csrc)],
        verbose=bool(os.environ.get("SOFTMAX_EXT_VERBOSE_BUILD")),
    )


def try_import_built() -> bool:
    """Import the ahead-of-time build if there is one (cheap); never JIT-compiles."""
    global _loaded, _module
    if not _loaded:
        try:
            from . import _C
        except ImportError:
            return False
        _loaded, _module = True, _C
    return True


def load() -> None:
    """Make sure the CPU kernels are registered with the dispatcher (idempotent, cheap)."""
    global _loaded
    if _loaded or try_import_built():
        return
    _jit_build()
    _loaded = True


def empty_cache() -> int:
    """Free the CPU gradient buffer kept for reuse between backward calls; returns bytes freed."""
    return int(_module.empty_cache()) if _module is not None else 0


def module():
    """The loaded extension module (softmax_ext._C or its JIT build), for its test hooks."""
    load()
    return _module

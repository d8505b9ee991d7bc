"""Triton kernels of softmax_ext: the CUDA implementation of the torch.library operators.

On CUDA tensors the kernels are reached through the dispatcher once :func:`register_cuda_kernels`
has run. On CPU tensors they run through Triton's interpreter (:func:`interpreter_kernels`), which
needs ``TRITON_INTERPRET=1`` in the environment before Triton is imported.
"""

import functools
import os
import threading
from types import SimpleNamespace
from typing import Callable

import torch

from .. import ops as _ops

OPS = ("softmax_fwd", "softmax_bwd", "ce_index_fwd", "ce_index_bwd", "ce_soft_fwd", "ce_soft_bwd")

_lock = threading.Lock()
_cuda_lib = None  # the torch.library.Library holding the CUDA registrations; kept alive here


@functools.lru_cache(maxsize=None)
def _launchers() -> SimpleNamespace:
    try:
        from .cross_entropy import ce_index_bwd, ce_index_fwd
        from .soft_cross_entropy import ce_soft_bwd, ce_soft_fwd
        from .softmax import softmax_bwd, softmax_fwd
    except ImportError as e:
        if e.name != "triton":
            raise
        raise ImportError(
            "softmax_ext: CUDA tensors run Triton kernels, and Triton is not installed "
            "(pip install triton, or softmax_ext[triton]); backend='torch' runs PyTorch's own"
        ) from e

    return SimpleNamespace(
        softmax_fwd=softmax_fwd,
        softmax_bwd=softmax_bwd,
        ce_index_fwd=ce_index_fwd,
        ce_index_bwd=ce_index_bwd,
        ce_soft_fwd=ce_soft_fwd,
        ce_soft_bwd=ce_soft_bwd,
    )


def _lazy_launcher(name: str) -> Callable:
    """The launcher ``name``, imported (with Triton) at its first call rather than now."""

    def launch(*args):
        return getattr(_launchers(), name)(*args)

    launch.__name__ = launch.__qualname__ = name
    return launch


def register_cuda_kernels() -> None:
    """Register the Triton launchers as the CUDA kernels of the six softmax_ext operators.

    Idempotent, thread-safe and cheap (Triton is imported at the first CUDA call, not here), so
    the package's import runs it; afterwards ``torch.ops.softmax_ext.*`` on CUDA tensors (and
    ``backend="auto"``) run these kernels.
    """
    global _cuda_lib
    if _cuda_lib is not None:
        return
    with _lock:
        if _cuda_lib is not None:
            return
        lib = torch.library.Library(_ops.NAMESPACE, "IMPL")
        for name in OPS:
            lib.impl(name, _lazy_launcher(name), "CUDA")
        _cuda_lib = lib


def interpreter_active() -> bool:
    """Whether this process's Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .softmax import _softmax_fwd_kernel

    return isinstance(_softmax_fwd_kernel, InterpretedFunction)


def interpreter_kernels() -> SimpleNamespace:
    """The six launchers (schema argument order) for CPU tensors, run by Triton's interpreter.

    Raises RuntimeError unless TRITON_INTERPRET=1 was set before Triton (and these kernels) were
    imported: without it the kernels are compiled for a GPU and cannot take CPU tensors.
    """
    flag = os.environ.get("TRITON_INTERPRET", "")
    enabled = flag.strip().lower() in ("1", "true", "on", "yes")
    if not (enabled and interpreter_active()):
        late = f" (TRITON_INTERPRET={flag!r} is set now, but too late)" if enabled else ""
        raise RuntimeError(
            "softmax_ext: backend='triton' on CPU tensors runs Triton's interpreter, which must be "
            f"enabled before Triton is imported{late}: set the environment variable "
            "TRITON_INTERPRET=1 when starting Python (e.g. `TRITON_INTERPRET=1 python ...`), or "
            "use backend='cpp' (or 'auto') for CPU tensors"
        )
    return _launchers()

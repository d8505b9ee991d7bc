"""Triton kernels of softmax_ext: the CUDA implementation of the torch.library operators.

On CUDA tensors the kernels are reached through the dispatcher once :func:`register_cuda_kernels`
has run. On CPU tensors they run through Triton's interpreter (:func:`interpreter_kernels`), which
needs ``TRITON_INTERPRET=1`` in the environment before Triton is imported.
"""

import os
import threading
from types import SimpleNamespace

import torch

from .. import ops as _ops

OPS = ("softmax_fwd", "softmax_bwd", "ce_index_fwd", "ce_index_bwd", "ce_soft_fwd", "ce_soft_bwd")

_lock = threading.Lock()
_cuda_lib = None  # the torch.library.Library holding the CUDA registrations; kept alive here


def _launchers() -> SimpleNamespace:
    from .cross_entropy import ce_index_bwd, ce_index_fwd
    from .soft_cross_entropy import ce_soft_bwd, ce_soft_fwd
    from .softmax import softmax_bwd, softmax_fwd

    return SimpleNamespace(
        softmax_fwd=softmax_fwd,
        softmax_bwd=softmax_bwd,
        ce_index_fwd=ce_index_fwd,
        ce_index_bwd=ce_index_bwd,
        ce_soft_fwd=ce_soft_fwd,
        ce_soft_bwd=ce_soft_bwd,
    )


def register_cuda_kernels() -> None:
    """Register the Triton launchers as the CUDA kernels of the six softmax_ext operators.

    Idempotent and thread-safe; afterwards ``torch.ops.softmax_ext.*`` on CUDA tensors (and
    ``backend="auto"``) run these kernels.
    """
    global _cuda_lib
    if _cuda_lib is not None:
        return
    with _lock:
        if _cuda_lib is not None:
            return
        launchers = _launchers()
        lib = torch.library.Library(_ops.NAMESPACE, "IMPL")
        for name in OPS:
            lib.impl(name, getattr(launchers, name), "CUDA")
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

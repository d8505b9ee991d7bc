"""Triton kernels of softmax_ext: the launchers behind the per-backend kernel operators.

softmax_ext/ops.py defines each kernel (``softmax_fwd``, ``ce_index_bwd``...) twice with one
schema: the device's kernel (``ops.kernel(name, ops.BACKEND_DEFAULT)``, C++ on CPU) and the Triton
kernel that backend='triton' picks (``ops.kernel(name, ops.BACKEND_TRITON)``). The launchers here
take the schema's arguments in order and serve:

* CUDA tensors, for both operators, once :func:`register_cuda_kernels` has run (the package's
  import runs it; Triton itself is imported at the first CUDA call);
* CPU tensors, for the backend='triton' operators only, once :func:`register_interpreter_kernels`
  has run: Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before
  Triton is imported.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import ops as _ops

#: Kernel operator -> the module of this package holding its launcher (a function of that name).
_LAUNCHER_MODULES = {
    "softmax_fwd": "softmax",
    "softmax_bwd": "softmax",
    "ce_index_fwd": "cross_entropy",
    "ce_index_bwd": "cross_entropy",
    "ce_soft_fwd": "soft_cross_entropy",
    "ce_soft_bwd": "soft_cross_entropy",
    "ce_index_bwd_into": "cross_entropy",
    "ce_soft_bwd_into": "soft_cross_entropy",
}
#: The kernel operators the launchers implement: all of ops.KERNELS (checked at registration).
OPS = tuple(_LAUNCHER_MODULES)

_lock = threading.Lock()
# The torch.library.Library objects holding the registrations: a registration lasts as long as
# its Library, so they are kept here for the life of the process.
_cuda_libs: Optional[List[torch.library.Library]] = None
_cpu_libs: Optional[List[torch.library.Library]] = None


@functools.lru_cache(maxsize=None)
def _launcher(name: str) -> Callable:
    """The launcher of kernel operator ``name``, importing Triton (and its kernels) if needed."""
    try:
        module = importlib.import_module(f"{__name__}.{_LAUNCHER_MODULES[name]}")
    except ImportError as e:
        if e.name != "triton":
            raise
        raise ImportError(
            "softmax_ext: CUDA tensors run Triton kernels, and Triton is not installed "
            "(pip install triton, or softmax_ext[triton]); backend='torch' runs PyTorch's own"
        ) from e
    return getattr(module, name)


def _lazy_launcher(name: str) -> Callable:
    """The launcher ``name``, imported (with Triton) at its first call rather than now."""

    def launch(*args):
        return _launcher(name)(*args)

    launch.__name__ = launch.__qualname__ = name
    return launch


def _check_ops() -> None:
    """Raise RuntimeError unless the launchers cover exactly the kernels ops.py defines."""
    if set(OPS) != set(_ops.KERNELS):
        raise RuntimeError(
            f"softmax_ext: the Triton launchers {sorted(OPS)} do not match the kernel operators "
            f"{sorted(_ops.KERNELS)} of softmax_ext/ops.py"
        )


def _register(
    key: str, backends: Sequence[int], launcher: Callable[[str], Callable]
) -> List[torch.library.Library]:
    """``launcher(name)`` registered for dispatch key ``key`` as every kernel operator that
    serves one of ``backends`` (ops.BACKEND_*); returns the Libraries holding the registrations,
    one per namespace."""
    _check_ops()
    libs: Dict[str, torch.library.Library] = {}
    for backend in backends:
        for name in OPS:
            op = _ops.kernel(name, backend)
            if op.namespace not in libs:
                libs[op.namespace] = torch.library.Library(op.namespace, "IMPL")
            libs[op.namespace].impl(op, launcher(name), key)
    return list(libs.values())


def register_cuda_kernels() -> None:
    """Register the Triton launchers as the CUDA kernels of the kernel operators, those of
    the default backend and those of backend='triton' alike.

    Idempotent, thread-safe and cheap (Triton is imported at the first CUDA call, not here), so
    the package's import runs it; afterwards the kernel operators on CUDA tensors (and the public
    operators with ``backend="auto"`` or ``"triton"``) run these kernels.
    """
    global _cuda_libs
    if _cuda_libs is not None:
        return
    with _lock:
        if _cuda_libs is None:
            backends = (_ops.BACKEND_DEFAULT, _ops.BACKEND_TRITON)
            _cuda_libs = _register("CUDA", backends, _lazy_launcher)


def interpreter_active() -> bool:
    """Whether this process's Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .softmax import _softmax_fwd_kernel

    return isinstance(_softmax_fwd_kernel, InterpretedFunction)


def register_interpreter_kernels() -> None:
    """Register the Triton launchers as the CPU kernels of the backend='triton' kernel
    operators, run by Triton's interpreter. The default backend's CPU kernels (C++) stay.

    Idempotent and thread-safe. Raises RuntimeError unless TRITON_INTERPRET=1 was set before
    Triton (and these kernels) were imported: without it the kernels are compiled for a GPU and
    cannot take CPU tensors.
    """
    global _cpu_libs
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
    if _cpu_libs is not None:
        return
    with _lock:
        if _cpu_libs is None:
            # Triton is imported already (interpreter_active), so the launchers themselves.
            _cpu_libs = _register("CPU", (_ops.BACKEND_TRITON,), _launcher)

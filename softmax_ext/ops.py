"""torch.library operators of softmax_ext: schemas, fake (meta) kernels and backend lookup.

The schemas are defined here, in Python, so that every backend registers implementations of the
same operators: the C++ extension registers the CPU kernels (``csrc/``), the Triton module the CUDA
kernels (``softmax_ext/triton``). torch.compile sees these operators, not Python internals.

All operators work on plain views prepared by :mod:`softmax_ext.functional`:

* softmax: any tensor and a non-negative ``dim``; the kernel treats it as (outer, C, inner).
* cross-entropy: ``logits`` is (rows, C) with unit class stride; index targets are int64 (rows,);
  soft targets are (rows, C) in the logits' dtype; ``weight`` is (C,) in the accumulation dtype.
  Per-row losses are in the accumulation dtype: float32 for float32, float16 and bfloat16 logits,
  float64 for float64. The per-row log-sum-exp is float64 for every dtype: the backward splits it
  as hi + lo and computes exp((x - hi) - lo), as exact as PyTorch's exp(log_softmax) even when the
  logits are large (near 1e4), where a float32 log-sum-exp alone would lose four digits.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

NAMESPACE = "softmax_ext"

_SCHEMAS = {
    # y = softmax(x, dim) or log_softmax(x, dim), in x's dtype.
    "softmax_fwd": "(Tensor input, int dim, bool log) -> Tensor",
    # grad_input from grad_output and the forward's output y.
    "softmax_bwd": "(Tensor grad_output, Tensor output, int dim, bool log) -> Tensor",
    # Per row: nll = w[t] * (lse - x[t]); smooth = sum_c w[c] * (lse - x[c]) (zeros unless
    # with_smooth); lse = log-sum-exp. Rows whose target is ignore_index get nll = smooth = 0.
    "ce_index_fwd": (
        "(Tensor logits, Tensor target, Tensor? weight, int ignore_index, bool with_smooth)"
        " -> (Tensor nll, Tensor smooth, Tensor lse)"
    ),
    # d/dlogits of sum_i grad_nll[i] * nll[i] + grad_smooth[i] * smooth[i]; grad_* may be
    # stride-0 expansions of a scalar.
    "ce_index_bwd": (
        "(Tensor grad_nll, Tensor grad_smooth, Tensor logits, Tensor target, Tensor? weight,"
        " Tensor lse, int ignore_index, bool with_smooth) -> Tensor"
    ),
    # Soft targets q = (1 - eps) * target + eps / C. Per row: loss = sum_c w[c] q[c] (lse - x[c]),
    # lse, and tsum = sum_c w[c] q[c] (which the backward needs).
    "ce_soft_fwd": (
        "(Tensor logits, Tensor target, Tensor? weight, float label_smoothing)"
        " -> (Tensor loss, Tensor lse, Tensor tsum)"
    ),
    # d/dlogits of sum_i grad_loss[i] * loss[i].
    "ce_soft_bwd": (
        "(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse,"
        " Tensor tsum, float label_smoothing) -> Tensor"
    ),
    # The whole class-index loss, reduced (reduction: 0 none, 1 mean, 2 sum, as torch's enum) and
    # differentiable through a C++ autograd node that calls ce_index_fwd / ce_index_bwd
    # (csrc/cross_entropy_autograd.cpp). Result in the accumulation dtype.
    "cross_entropy_index": (
        "(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
        " int reduction) -> Tensor"
    ),
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in _SCHEMAS.items():
    _lib.define(_name + _schema)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in (and write per-row results in) for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_row(logits: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return logits.new_empty((logits.shape[0],), dtype=dtype or acc_dtype(logits.dtype))


@torch.library.register_fake(f"{NAMESPACE}::softmax_fwd")
def _softmax_fwd_fake(input: Tensor, dim: int, log: bool) -> Tensor:
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::softmax_bwd")
def _softmax_bwd_fake(grad_output: Tensor, output: Tensor, dim: int, log: bool) -> Tensor:
    return torch.empty_like(output, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::ce_index_fwd")
def _ce_index_fwd_fake(logits, target, weight, ignore_index, with_smooth):
    return _per_row(logits), _per_row(logits), _per_row(logits, torch.float64)


@torch.library.register_fake(f"{NAMESPACE}::ce_index_bwd")
def _ce_index_bwd_fake(
    grad_nll, grad_smooth, logits, target, weight, lse, ignore_index, with_smooth
):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::ce_soft_fwd")
def _ce_soft_fwd_fake(logits, target, weight, label_smoothing):
    return _per_row(logits), _per_row(logits, torch.float64), _per_row(logits)


@torch.library.register_fake(f"{NAMESPACE}::ce_soft_bwd")
def _ce_soft_bwd_fake(grad_loss, logits, target, weight, lse, tsum, label_smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::cross_entropy_index")
def _cross_entropy_index_fake(logits, target, weight, ignore_index, label_smoothing, reduction):
    shape = (logits.shape[0],) if reduction == 0 else ()
    return logits.new_empty(shape, dtype=acc_dtype(logits.dtype))


def dispatched() -> SimpleNamespace:
    """The operators as the dispatcher serves them (CPU → C++, CUDA → Triton)."""
    ops = getattr(torch.ops, NAMESPACE)
    return SimpleNamespace(**{name: getattr(ops, name).default for name in _SCHEMAS})


BACKENDS = ("auto", "cpp", "triton", "torch")


_kernel_cache: dict = {}


def kernels_for(backend: str, device: torch.device) -> SimpleNamespace:
    """Cached :func:`resolve_kernels`: called on every op, so the lookup must be cheap.

    torch.compile traces this function: a hit is a constant to it, while a miss would trace the
    imports and registrations of :func:`resolve_kernels` and break the graph. The package's import
    therefore fills the cache for the usual pairs (:func:`warm_kernel_cache`).
    """
    key = (backend, device.type)
    kernels = _kernel_cache.get(key)
    if kernels is None:
        kernels = _kernel_cache[key] = resolve_kernels(backend, device)
    return kernels


def warm_kernel_cache(cpu_kernels_loaded: bool) -> None:
    """Resolve the backends of the CPU (when the C++ extension is loaded) and CUDA devices now.

    Cheap: the C++ extension is already imported, and the Triton launchers registered for CUDA
    import Triton only when first called. A C++ extension that is not built yet is JIT-compiled
    at first use instead, outside any compiled region.
    """
    pairs = [("auto", "cuda"), ("triton", "cuda")]
    if cpu_kernels_loaded:
        pairs += [("auto", "cpu"), ("cpp", "cpu")]
    for backend, kind in pairs:
        kernels_for(backend, torch.device(kind))


def resolve_kernels(backend: str, device: torch.device) -> SimpleNamespace:
    """Return the operators (named as in the schemas) that serve ``backend`` on ``device``.

    Triton's interpreter namespace has the six per-row kernels only, not ``cross_entropy_index``:
    callers fall back to the Python autograd Function there.

    "auto" picks C++ on CPU and Triton on CUDA. "triton" on a CPU tensor runs the Triton kernels
    directly through Triton's interpreter (``TRITON_INTERPRET=1``); the dispatcher cannot route
    CPU tensors to Triton because CPU belongs to the C++ kernels.
    Raises RuntimeError when the backend cannot serve the device.
    """
    if backend not in ("auto", "cpp", "triton"):
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kind = device.type
    if kind == "cpu":
        if backend == "triton":
            from . import triton as _triton

            return _triton.interpreter_kernels()
        from . import _cpp

        _cpp.load()
        return dispatched()
    if kind == "cuda":
        if backend == "cpp":
            raise RuntimeError(
                "softmax_ext: backend='cpp' runs on CPU tensors only; use backend='triton' "
                "(or 'auto') for CUDA tensors"
            )
        from . import triton as _triton

        _triton.register_cuda_kernels()
        return dispatched()
    raise RuntimeError(
        f"softmax_ext: no kernels for device type {kind!r}; backend='torch' runs PyTorch's own "
        "implementation on any device"
    )

"""The torch.library operators of softmax_ext: each defined once, here, with its fake kernel.

Two kinds of operator, both plain views in and out (softmax_ext.functional prepares them):

* The public operators ``softmax``, ``cross_entropy_index`` and ``cross_entropy_soft``. Their
  autograd is one C++ node each (csrc/*_autograd.cpp), the same on every device: it runs the
  forward kernel, reduces, saves O(rows) statistics and calls the backward kernel.
* The per-backend kernels (``softmax_fwd``, ``ce_index_bwd``...) that those nodes call through the
  dispatcher. ``softmax_ext::<kernel>`` runs the device's kernels: C++ on CPU (csrc/), Triton on
  CUDA (softmax_ext/triton). The same kernel in the namespace ``softmax_ext_triton`` runs the
  Triton kernels on CPU tensors through Triton's interpreter (tests); the nodes call it when the
  operator's ``backend`` argument is :data:`BACKEND_TRITON`. (A namespace, not an overload:
  torch.library.opcheck refuses operators with overloads.)

Every cross-entropy operator ends with the same option block, :class:`LossOptions`, in the same
order; C++ reads it by name into ``sme::LossOptions`` (csrc/loss_options.h), the Triton launchers
into :class:`LossOptions`. The nodes pass it to the kernels whole, so a new option is a field here
and in loss_options.h, plus its use in the kernels.

Shapes and dtypes: ``logits`` is (rows, C) with unit class stride; index targets are int64
(rows,); soft targets are (rows, C) in the logits' dtype; ``weight`` is (C,), contiguous, in the
accumulation dtype. Per-row results are in the accumulation dtype (float64 for float64 logits,
float32 otherwise), except the log-sum-exp, float64 for every dtype: the backward splits it as
hi + lo and computes exp((x - hi) - lo), as exact as PyTorch's exp(log_softmax) even when the
logits are large (near 1e4), where a float32 log-sum-exp alone would lose four digits. The public
cross-entropy operators return the loss in the logits' dtype, rounded once from the accumulation
dtype.
"""

from __future__ import annotations

import typing
from types import SimpleNamespace
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch

NAMESPACE = "softmax_ext"
TRITON_NAMESPACE = "softmax_ext_triton"
BACKENDS = ("auto", "cpp", "triton", "torch")
BACKEND_DEFAULT = 0  # the dispatcher's kernels for the device: C++ on CPU, Triton on CUDA
BACKEND_TRITON = 1  # the kernels of TRITON_NAMESPACE: Triton's interpreter on CPU tensors


class LossOptions(NamedTuple):
    """The cross-entropy option block, in schema order (the names are the schema's)."""

    ignore_index: int = -100  # index targets: rows with this target give 0 and no gradient
    label_smoothing: float = 0.0  # q = (1 - eps) * target + eps / C
    reduction: int = 1  # torch's at::Reduction: 0 none, 1 mean, 2 sum (the nodes reduce)
    # the z-loss weight; the z-loss itself is added by softmax_ext.functional from the operators'
    # log-sum-exp output, so a nonzero value only keeps the loss in the accumulation dtype (one
    # rounding after the addition instead of two)
    lse_square_scale: float = 0.0
    # logit soft-capping: > 0 makes the kernels use cap * tanh(x / cap) for each logit x; 0 is off
    softcap: float = 0.0


_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool"}
OPTIONS = ", ".join(
    f"{_SCHEMA_TYPES[t]} {n}" for n, t in typing.get_type_hints(LossOptions).items()
)

# name -> (arguments, outputs as (name, kind)). Output kinds, which the fake kernels follow:
# "like <arg>": a contiguous tensor of that argument's shape and dtype; "rows": (rows,) in the
# accumulation dtype; "rows64": (rows,) float64; "loss": the reduced loss (per row for
# reduction 0, else a scalar) in the logits' dtype (the accumulation dtype with a z-loss).
_Spec = Tuple[str, List[Tuple[str, str]]]

PUBLIC: Dict[str, _Spec] = {
    # softmax (log=False) or log_softmax (log=True) along dim, in the input's dtype.
    "softmax": ("Tensor input, int dim, bool log, int backend", [("out", "like input")]),
    # Cross-entropy against int64 class indices, reduced, and each row's log-sum-exp (which is
    # differentiable: the z-loss and return_lse of softmax_ext.cross_entropy are built on it).
    "cross_entropy_index": (
        f"Tensor logits, Tensor target, Tensor? weight, {OPTIONS}, int backend",
        [("loss", "loss"), ("lse", "rows64")],
    ),
    # Cross-entropy against (rows, C) class probabilities, reduced (a mean divides by rows), and
    # each row's log-sum-exp.
    "cross_entropy_soft": (
        f"Tensor logits, Tensor target, Tensor? weight, {OPTIONS}, int backend",
        [("loss", "loss"), ("lse", "rows64")],
    ),
}

KERNELS: Dict[str, _Spec] = {
    "softmax_fwd": ("Tensor input, int dim, bool log", [("out", "like input")]),
    # grad_input from grad_output and the forward's output.
    "softmax_bwd": (
        "Tensor grad_output, Tensor output, int dim, bool log",
        [("grad_input", "like output")],
    ),
    # Per row: loss = (1 - eps) * w[t] * (lse - x[t]) + eps / C * sum_c w[c] * (lse - x[c]), 0 for
    # rows whose target is ignore_index; lse = log-sum-exp of the row.
    "ce_index_fwd": (
        f"Tensor logits, Tensor target, Tensor? weight, {OPTIONS}",
        [("loss", "rows"), ("lse", "rows64")],
    ),
    # d/dlogits of sum_i grad_loss[i] * loss[i] + grad_lse[i] * lse[i] (grad_lse None: 0);
    # grad_loss may be a stride-0 expansion.
    "ce_index_bwd": (
        "Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse,"
        f" Tensor? grad_lse, {OPTIONS}",
        [("grad_logits", "like logits")],
    ),
    # q = (1 - eps) * target + eps / C. Per row: loss = sum_c w[c] q[c] (lse - x[c]), lse, and
    # tsum = sum_c w[c] q[c] (which the backward needs).
    "ce_soft_fwd": (
        f"Tensor logits, Tensor target, Tensor? weight, {OPTIONS}",
        [("loss", "rows"), ("lse", "rows64"), ("tsum", "rows")],
    ),
    # d/dlogits of sum_i grad_loss[i] * loss[i] + grad_lse[i] * lse[i] (grad_lse None: 0).
    "ce_soft_bwd": (
        "Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor tsum,"
        f" Tensor? grad_lse, {OPTIONS}",
        [("grad_logits", "like logits")],
    ),
    # The two backward kernels writing into a given contiguous (rows, C) grad_logits of the
    # logits' dtype, which may be the logits themselves (each value is read before it is
    # overwritten): the fused linear head's chunks keep one buffer instead of two.
    "ce_index_bwd_into": (
        "Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse,"
        f" Tensor? grad_lse, Tensor(a!) grad_logits, {OPTIONS}",
        [],
    ),
    "ce_soft_bwd_into": (
        "Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor tsum,"
        f" Tensor? grad_lse, Tensor(a!) grad_logits, {OPTIONS}",
        [],
    ),
}


def schema(name: str) -> str:
    """The schema (without the operator name) of a public operator or a kernel."""
    args, outs = {**PUBLIC, **KERNELS}[name]
    out = ", ".join(f"Tensor {n}" for n, _ in outs)
    return f"({args}) -> " + (f"({out})" if len(outs) != 1 else "Tensor")


def loss_dtype(dtype: torch.dtype, options) -> torch.dtype:
    """The dtype of a public cross-entropy operator's loss for logits of ``dtype``: the logits'
    own, or the accumulation dtype when a z-loss is still to be added (``options`` maps the
    option names to values)."""
    return acc_dtype(dtype) if options["lse_square_scale"] else dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in (and write per-row results in) for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_kernel(name: str) -> Callable:
    """A fake (meta) kernel that follows the output kinds of ``name``'s spec."""
    args, outs = {**PUBLIC, **KERNELS}[name]
    arg_names = [a.split()[-1] for a in args.split(", ")]

    def fake(*values):
        bound = dict(zip(arg_names, values, strict=True))
        logits = bound.get("logits")
        made = []
        for _, kind in outs:
            if kind.startswith("like "):
                made.append(
                    torch.empty_like(bound[kind[5:]], memory_format=torch.contiguous_format)
                )
            elif kind == "loss":
                shape = (logits.shape[0],) if bound["reduction"] == 0 else ()
                made.append(logits.new_empty(shape, dtype=loss_dtype(logits.dtype, bound)))
            else:
                dtype = torch.float64 if kind == "rows64" else acc_dtype(logits.dtype)
                made.append(logits.new_empty((logits.shape[0],), dtype=dtype))
        if not made:  # a kernel that writes into one of its arguments
            return None
        return tuple(made) if len(made) > 1 else made[0]

    fake.__name__ = f"_{name}_fake"
    return fake


_lib = torch.library.Library(NAMESPACE, "DEF")
_triton_lib = torch.library.Library(TRITON_NAMESPACE, "DEF")
for _name in PUBLIC:
    _lib.define(_name + schema(_name))
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake_kernel(_name), lib=_lib)
for _name in KERNELS:
    for _ns, _l in ((NAMESPACE, _lib), (TRITON_NAMESPACE, _triton_lib)):
        _l.define(_name + schema(_name))
        torch.library.register_fake(f"{_ns}::{_name}", _fake_kernel(_name), lib=_l)


_backend_cache: Dict[Tuple[str, str], int] = {}


def backend_code(backend: str, device: torch.device) -> int:
    """The ``backend`` argument of the public operators for a user's ``backend`` on ``device``.

    The one place that picks kernels. Cached because it runs on every call; torch.compile traces
    it, so a hit is a constant to it, while a miss would trace the imports and registrations of
    :func:`_resolve` and break the graph: the package's import fills the cache for the usual pairs
    (:func:`warm_backend_cache`).
    """
    key = (backend, device.type)
    code = _backend_cache.get(key)
    if code is None:
        code = _backend_cache[key] = _resolve(backend, device.type)
    return code


def warm_backend_cache(cpu_kernels_loaded: bool) -> None:
    """Resolve the backends of the CPU (when the C++ extension is loaded) and CUDA devices now.

    Cheap: the Triton launchers registered for CUDA import Triton only when first called. A C++
    extension that is not built yet is JIT-compiled at first use instead, outside any compiled
    region.
    """
    if not cpu_kernels_loaded:
        return
    for backend, kind in (("auto", "cuda"), ("triton", "cuda"), ("auto", "cpu"), ("cpp", "cpu")):
        backend_code(backend, torch.device(kind))


def _resolve(backend: str, kind: str) -> int:
    """ "auto" is C++ on CPU and Triton on CUDA; "triton" on a CPU tensor runs the Triton kernels
    through Triton's interpreter (``TRITON_INTERPRET=1``). Raises RuntimeError when the backend
    cannot serve the device."""
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from . import _cpp

    _cpp.load()  # the autograd nodes are C++ on every device
    if kind == "cpu":
        if backend == "triton":
            from . import triton as _triton

            _triton.register_interpreter_kernels()
            return BACKEND_TRITON
        return BACKEND_DEFAULT
    if kind == "cuda":
        if backend == "cpp":
            raise RuntimeError(
                "softmax_ext: backend='cpp' runs on CPU tensors only; use backend='triton' "
                "(or 'auto') for CUDA tensors"
            )
        from . import triton as _triton

        _triton.register_cuda_kernels()
        return BACKEND_DEFAULT
    raise RuntimeError(
        f"softmax_ext: no kernels for device type {kind!r}; backend='torch' runs PyTorch's own "
        "implementation on any device"
    )


def public_op(name: str) -> "torch._ops.OpOverload":
    """The public operator ``name`` (its autograd node is C++; see the module docstring)."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def kernel(name: str, backend: int = BACKEND_DEFAULT) -> "torch._ops.OpOverload":
    """The kernel operator ``name`` as the node with ``backend`` calls it (tests, tools)."""
    namespace = NAMESPACE if backend == BACKEND_DEFAULT else TRITON_NAMESPACE
    return getattr(getattr(torch.ops, namespace), name).default


def kernels(backend: str, device: torch.device) -> SimpleNamespace:
    """The kernels, by name, as ``backend`` serves them on ``device`` (tests, tools)."""
    code = backend_code(backend, device)
    return SimpleNamespace(**{n: kernel(n, code) for n in KERNELS})

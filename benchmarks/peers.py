"""The implementations under comparison, each as ``fn(x, target) -> output`` for every op it has.

* softmax_ext: this project, with the backend its device has ("cpp" on CPU, "triton" on CUDA);
* torch: PyTorch eager (torch.nn.functional);
* torch.compile: the same eager functions through torch.compile (inductor), compiled once per
  shape and dtype: the runner calls :func:`fresh_compile_cache` before each new shape/dtype;
* softmax_ext.lm: softmax_ext's cross-entropy with the language-model options of
  ``config.LM_OPTIONS`` (logit soft-capping and the z-loss), to set against the plain loss;
* liger: Liger-Kernel's Triton cross-entropy, on CUDA only and where it is importable. It writes
  the gradient into its input during the forward pass, so it gets a private copy of the logits.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Fn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class Impl:
    """One implementation: its name, the backend it runs, and a factory of per-op functions."""

    name: str
    backend: str
    ops: Tuple[str, ...]
    make: Callable[[str], Fn]
    # True when the implementation overwrites its input (it then gets its own copy).
    writes_input: bool = False


def eager_fn(op: str) -> Fn:
    """PyTorch's own function for ``op``; classes along the last dim, mean-reduced loss."""
    if op == "cross_entropy":
        return lambda x, t: F.cross_entropy(x, t)
    if op == "softmax":
        return lambda x, t: F.softmax(x, dim=-1)
    if op == "log_softmax":
        return lambda x, t: F.log_softmax(x, dim=-1)
    raise ValueError(f"unknown op {op!r}")


def ext_fn(op: str, backend: str) -> Fn:
    """softmax_ext's function for ``op`` with ``backend``."""
    import softmax_ext

    if op == "cross_entropy":
        return lambda x, t: softmax_ext.cross_entropy(x, t, backend=backend)
    if op == "softmax":
        return lambda x, t: softmax_ext.softmax(x, -1, backend=backend)
    if op == "log_softmax":
        return lambda x, t: softmax_ext.log_softmax(x, -1, backend=backend)
    raise ValueError(f"unknown op {op!r}")


def ext_lm_fn(op: str, backend: str) -> Fn:
    """softmax_ext's cross-entropy with ``config.LM_OPTIONS`` (the only op of softmax_ext.lm)."""
    import softmax_ext

    from .config import LM_OPTIONS

    if op != "cross_entropy":
        raise ValueError(f"softmax_ext.lm has cross_entropy only, not {op!r}")
    return lambda x, t: softmax_ext.cross_entropy(x, t, backend=backend, **LM_OPTIONS)


def compiled_fn(op: str) -> Fn:
    """The eager function through torch.compile (static shapes, one graph)."""
    return torch.compile(eager_fn(op), dynamic=False, fullgraph=True)


def fresh_compile_cache() -> None:
    """Forget compiled graphs so the next shape/dtype compiles afresh.

    Dynamo caches per code object; without a reset a long sweep would hit its recompile limit
    and silently fall back to eager, or switch to dynamic shapes after the second shape.
    """
    import torch._dynamo

    torch._dynamo.reset()


def _liger_fn(op: str) -> Fn:
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as ce
    except ImportError:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        ce = LigerCrossEntropyLoss()

    def fn(x: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
        out = ce(x, t)
        return out[0] if isinstance(out, tuple) else out  # some versions return (loss, z_loss)

    return fn


def default_ext_backend(device: torch.device) -> str:
    """The softmax_ext backend a device has: "cpp" on CPU, "triton" on CUDA."""
    return "triton" if device.type == "cuda" else "cpp"


def _ext_unavailable(device: torch.device, backend: str) -> Optional[str]:
    """Why softmax_ext with ``backend`` cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("softmax_ext") is None:
        return "softmax_ext is not importable (run from the repository root or pip install -e .)"
    if backend == "cpp" and importlib.util.find_spec("softmax_ext._C") is None:
        # softmax_ext would JIT-compile the extension (minutes); a benchmark should not.
        return (
            "softmax_ext._C is not built: run `make build` (pip install --no-build-isolation -e .)"
        )
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if backend == "triton" and device.type != "cuda":
        return "the triton backend runs on CUDA here (the CPU interpreter is far too slow to time)"
    return None


def available(
    device: torch.device, wanted: Sequence[str], ext_backend: Optional[str] = None
) -> Tuple[List[Impl], Dict[str, str]]:
    """The implementations of ``wanted`` that can run on ``device``, and why the others cannot."""
    impls: List[Impl] = []
    skipped: Dict[str, str] = {}
    all_ops = ("softmax", "log_softmax", "cross_entropy")
    for name in wanted:
        if name == "softmax_ext":
            backend = ext_backend or default_ext_backend(device)
            why = None if backend == "torch" else _ext_unavailable(device, backend)
            if why:
                skipped[name] = why
                continue
            impls.append(Impl(name, backend, all_ops, lambda op, b=backend: ext_fn(op, b)))
        elif name == "softmax_ext.lm":
            backend = ext_backend or default_ext_backend(device)
            why = None if backend == "torch" else _ext_unavailable(device, backend)
            if why:
                skipped[name] = why
                continue
            make = lambda op, b=backend: ext_lm_fn(op, b)  # noqa: E731
            impls.append(Impl(name, backend, ("cross_entropy",), make))
        elif name == "torch":
            impls.append(Impl(name, "eager", all_ops, eager_fn))
        elif name == "torch.compile":
            impls.append(Impl(name, "inductor", all_ops, compiled_fn))
        elif name == "liger":
            if device.type != "cuda":
                skipped[name] = "Liger-Kernel runs on CUDA only"
            elif importlib.util.find_spec("liger_kernel") is None:
                skipped[name] = "liger_kernel is not installed"
            else:
                impls.append(Impl(name, "triton", ("cross_entropy",), _liger_fn, writes_input=True))
        else:
            raise ValueError(f"unknown implementation {name!r}")
    return impls, skipped

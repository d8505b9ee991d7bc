"""Inputs for each op and the timed step of each direction (fwd, bwd, fwd+bwd).

All directions run with ``x.requires_grad``: the forward does what it does in training (saving
what its backward needs). Gradients come from torch.autograd.grad, so nothing accumulates into
``x.grad``. "bwd" re-runs the forward untimed before every timed backward: torch.compile's
backward refuses ``retain_graph`` (donated buffers) and Liger's forward rewrites its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Set

import torch
from torch import Tensor

from .peers import Fn
from .timing import Step


@dataclass
class Inputs:
    """Logits ``x`` (rows, classes) requiring grad, int64 ``target`` (cross-entropy only) and the
    upstream gradient ``dy`` (softmax ops only; cross-entropy's scalar loss gets 1)."""

    x: Tensor
    target: Optional[Tensor]
    dy: Optional[Tensor]


def make_inputs(
    op: str, rows: int, classes: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> Inputs:
    """Random inputs for ``op`` at (rows, classes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, classes, generator=gen, dtype=dtype, device=device).requires_grad_()
    if op == "cross_entropy":
        target = torch.randint(0, classes, (rows,), generator=gen, device=device)
        return Inputs(x, target, None)
    dy = torch.randn(rows, classes, generator=gen, dtype=dtype, device=device)
    return Inputs(x, None, dy)


def private_copy(inputs: Inputs) -> Inputs:
    """The same inputs with a copy of ``x``, for implementations that overwrite their input."""
    return Inputs(inputs.x.detach().clone().requires_grad_(), inputs.target, inputs.dy)


def storages(inputs: Inputs) -> Set[int]:
    """Storage addresses of the inputs (saved tensors that are just the inputs cost nothing)."""
    return {
        t.untyped_storage().data_ptr()
        for t in (inputs.x, inputs.target, inputs.dy)
        if t is not None
    }


def forward_backward(fn: Fn, inputs: Inputs) -> Tensor:
    """One training step's worth of ``fn``: forward, then the gradient w.r.t. the logits."""
    out = fn(inputs.x, inputs.target)
    (grad,) = torch.autograd.grad(out, inputs.x, inputs.dy)
    return grad


def make_step(fn: Fn, inputs: Inputs, direction: str) -> Step:
    """The :class:`Step` that times ``direction`` of ``fn`` on ``inputs``."""
    x, target, dy = inputs.x, inputs.target, inputs.dy
    if direction == "fwd":
        return Step(run=lambda: fn(x, target))
    if direction == "fwd+bwd":
        return Step(run=lambda: forward_backward(fn, inputs))
    if direction == "bwd":
        pending = []

        def prepare() -> None:
            pending.append(fn(x, target))

        def run() -> Tensor:
            (grad,) = torch.autograd.grad(pending.pop(), x, dy)
            return grad

        return Step(run=run, prepare=prepare)
    raise ValueError(f"unknown direction {direction!r}")

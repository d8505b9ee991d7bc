"""Modules: drop-in replacements for torch.nn.CrossEntropyLoss, Softmax and LogSoftmax.

Each subclasses its PyTorch twin, so ``isinstance`` checks, ``state_dict`` keys (``weight`` is a
buffer), ``.to()`` and ``repr`` behave exactly as with PyTorch's module.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional as SF


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by softmax_ext's fused kernels.

    Args are PyTorch's (``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``) plus the
    keyword-only ``backend`` ("auto", "cpp", "triton" or "torch").
    """

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        SF._check_backend(backend)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return SF.cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            backend=self.backend,
        )


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax`` computed by softmax_ext's kernels."""

    def __init__(self, dim: Optional[int] = None, *, backend: str = "auto") -> None:
        super().__init__(dim)
        SF._check_backend(backend)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return SF.softmax(input, self.dim, backend=self.backend)


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` computed by softmax_ext's kernels."""

    def __init__(self, dim: Optional[int] = None, *, backend: str = "auto") -> None:
        super().__init__(dim)
        SF._check_backend(backend)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return SF.log_softmax(input, self.dim, backend=self.backend)

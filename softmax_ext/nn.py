"""Modules: drop-in replacements for torch.nn.CrossEntropyLoss, LinearCrossEntropyLoss, Softmax,
LogSoftmax, Softmax2d.

Each subclasses its PyTorch twin (LinearCrossEntropyLoss, new in torch 2.13, mirrors its layout
instead), so ``isinstance`` checks, ``state_dict`` keys (``weight`` is a
buffer), ``.to()`` and ``repr`` behave exactly as with PyTorch's module.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import functional as SF


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by softmax_ext's fused kernels.

    Args are PyTorch's, in its order (``weight``, ``size_average``, ``ignore_index``, ``reduce``,
    ``reduction``, ``label_smoothing``; the deprecated two as torch handles them), plus the
    keyword-only ``lse_square_scale``, ``softcap``, ``return_z_loss``, ``return_lse`` (see
    :func:`softmax_ext.cross_entropy`; named as in Liger-Kernel and flash-attn), ``backend``
    ("auto", "cpp", "triton" or "torch") and ``process_group`` (vocabulary parallelism: the
    logits are this rank's slice of the classes, as flash-attn's ``CrossEntropyLoss`` takes it).
    """

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average: Optional[bool] = None,
        ignore_index: int = -100,
        reduce: Optional[bool] = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        lse_square_scale: float = 0.0,
        softcap: Optional[float] = None,
        return_z_loss: bool = False,
        return_lse: bool = False,
        backend: str = "auto",
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ) -> None:
        super().__init__(
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        SF._check_backend(backend)
        SF._check_lse_square_scale(lse_square_scale)
        if softcap is not None:
            SF._check_softcap(softcap)
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.return_lse = return_lse
        self.backend = backend
        self.process_group = process_group

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """TorchScript cannot compile softmax_ext's Python layer: torch.jit.script gets torch's own
        module with the same configuration (and the same ``weight`` buffer) instead."""
        if self.process_group is not None:
            raise RuntimeError("torch.jit.script: a process_group loss cannot be scripted")
        if (
            self.lse_square_scale
            or self.softcap is not None
            or self.return_z_loss
            or self.return_lse
        ):
            raise RuntimeError(
                "torch.jit.script: torch.nn.CrossEntropyLoss has no lse_square_scale, softcap, "
                "return_z_loss or return_lse, so this configuration cannot be scripted"
            )
        return torch.nn.CrossEntropyLoss(
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def forward(self, input: Tensor, target: Tensor) -> Union[Tensor, Tuple[Tensor, ...]]:
        return SF.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            return_z_loss=self.return_z_loss,
            return_lse=self.return_lse,
            backend=self.backend,
            process_group=self.process_group,
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """A linear layer and cross-entropy in one: the drop-in for ``torch.nn.LinearCrossEntropyLoss``
    (same arguments, defaults and ``state_dict`` layout: ``linear.weight``, ``linear.bias`` and the
    ``weight`` buffer), computed by :func:`softmax_ext.linear_cross_entropy` without the logits.

    Args:
        in_features: H, the input's last dim.
        num_classes: V, the number of classes.
        bias: whether the projection has a bias.
        device, dtype: of the projection's parameters.
        reduction, weight, ignore_index, label_smoothing: as ``torch.nn.CrossEntropyLoss``
            (``ignore_index=None`` means -100, as in torch's module).
        lse_square_scale, softcap, return_z_loss, return_lse, chunk_size, backend: keyword-only
            extras, see :func:`softmax_ext.linear_cross_entropy`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = -100,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        softcap: Optional[float] = None,
        return_z_loss: bool = False,
        return_lse: bool = False,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        SF._check_backend(backend)
        SF._check_lse_square_scale(lse_square_scale)
        if softcap is not None:
            SF._check_softcap(softcap)
        self.in_features, self.num_classes = in_features, num_classes
        self.linear = torch.nn.Linear(
            in_features, num_classes, bias=bias, device=device, dtype=dtype
        )
        self.register_buffer("weight", weight)
        self.weight: Optional[Tensor]
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.return_lse = return_lse
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Union[Tensor, Tuple[Tensor, ...]]:
        return SF.linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            return_z_loss=self.return_z_loss,
            return_lse=self.return_lse,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
        )


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax`` computed by softmax_ext's kernels."""

    def __init__(self, dim: Optional[int] = None, *, backend: str = "auto") -> None:
        super().__init__(dim)
        SF._check_backend(backend)
        self.backend = backend

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """torch.jit.script gets torch's own module (see CrossEntropyLoss)."""
        return torch.nn.Softmax(self.dim)

    def forward(self, input: Tensor) -> Tensor:
        return SF.softmax(input, self.dim, _stacklevel=5, backend=self.backend)


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` computed by softmax_ext's kernels."""

    def __init__(self, dim: Optional[int] = None, *, backend: str = "auto") -> None:
        super().__init__(dim)
        SF._check_backend(backend)
        self.backend = backend

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """torch.jit.script gets torch's own module (see CrossEntropyLoss)."""
        return torch.nn.LogSoftmax(self.dim)

    def forward(self, input: Tensor) -> Tensor:
        return SF.log_softmax(input, self.dim, _stacklevel=5, backend=self.backend)


class Softmax2d(torch.nn.Softmax2d):
    """``torch.nn.Softmax2d`` (softmax over the channels of (N, C, H, W) or (C, H, W) inputs)
    computed by softmax_ext's kernels."""

    def __init__(self, *, backend: str = "auto") -> None:
        super().__init__()
        SF._check_backend(backend)
        self.backend = backend

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """torch.jit.script gets torch's own module (see CrossEntropyLoss)."""
        return torch.nn.Softmax2d()

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in (3, 4):
            raise ValueError(
                f"Softmax2d: expected input to be 3D or 4D, got {input.dim()}D instead"
            )
        return SF.softmax(input, -3, _stacklevel=5, backend=self.backend)

"""Public functions: ``cross_entropy``, ``softmax`` and ``log_softmax``, with PyTorch's signatures.

This layer checks arguments (raising the exceptions PyTorch raises), normalises shapes to the plain
views the operators take (softmax_ext.ops), and gathers the cross-entropy options into their block.
Everything after that (reduction, autograd, kernels) is one C++ operator per function.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction as _Reduction

from . import linear_ce_op as _linear_ce
from . import ops as _ops
from .ops import BACKENDS, acc_dtype, backend_code

_softmax_op = _ops.public_op("softmax")
_ce_index_op = _ops.public_op("cross_entropy_index")
_ce_soft_op = _ops.public_op("cross_entropy_soft")
_linear_ce_op = _linear_ce.linear_cross_entropy_op

_REDUCTIONS = ("none", "mean", "sum")  # indexed by torch's at::Reduction enum
_HALF_TYPES = (torch.float16, torch.bfloat16)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _torch_serves(backend: str) -> bool:
    """Whether PyTorch's own implementation runs this call instead of the fused kernels.

    Besides ``backend="torch"``: under ``torch.jit.trace``, whose graph must hold ops that
    TorchScript can save and load where softmax_ext is not installed. It gives torch's values, with
    torch's speed.
    """
    return backend == "torch" or torch.jit.is_tracing()


def _check_floating(input: Tensor, op: str) -> None:
    if not input.is_floating_point():
        raise NotImplementedError(
            f"softmax_ext.{op}: expected floating point input (float16, bfloat16, float32 or "
            f"float64), got {input.dtype}"
        )


def _index_target_checks(input: Tensor, target: Tensor) -> None:
    """PyTorch's nll_loss_nd checks of class-index targets against the input's shape."""
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError(
            "0D or 1D target tensor expected, multi-target not supported "
            f"(input {list(input.shape)}, target {list(target.shape)})"
        )
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}"
        )
    if input.dim() == 1:
        if target.dim() != 0:
            raise RuntimeError(
                "0D target tensor expected for 1D input (one sample of C classes), "
                f"got a target of shape {list(target.shape)}"
            )
        return
    if target.dim() == 0 or input.shape[0] != target.shape[0]:
        tb = target.shape[0] if target.dim() > 0 else "none"
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({tb})."
        )
    if input.dim() > 2 and target.shape[1:] != input.shape[2:]:
        expected = [input.shape[0], *input.shape[2:]]
        raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")


def _dtype_name(dtype: torch.dtype) -> str:
    return {
        torch.int32: "Int",
        torch.int16: "Short",
        torch.int8: "Char",
        torch.bool: "Bool",
        torch.float32: "Float",
        torch.float64: "Double",
        torch.float16: "Half",
        torch.bfloat16: "BFloat16",
        torch.long: "Long",
        torch.uint8: "Byte",
    }.get(dtype, str(dtype))


def _rows_view(input: Tensor) -> Tensor:
    """(C,), (N, C) or (N, C, d1..dk) logits as a (rows, C) view with unit class stride.

    (N, C) inputs keep their row stride (a column slice of a wider tensor is not copied);
    spatial inputs move the class dim last, which copies unless they are channels-last.
    """
    if input.dim() == 1:
        input = input.unsqueeze(0)
    elif input.dim() > 2:
        rows = input.shape[0] * math.prod(input.shape[2:])  # not -1: C may be 0 (an empty shard)
        input = input.movedim(1, -1).reshape(rows, input.shape[1])
    if input.stride(1) != 1 and input.shape[1] > 1:
        input = input.contiguous()
    return input


def _autocast_fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    """torch's autocast "fp32" policy: under autocast, float16/bfloat16 tensors run in float32."""
    if t is not None and t.dtype in _HALF_TYPES and torch.is_autocast_enabled(t.device.type):
        return t.float()
    return t


def cross_entropy(
    input: Tensor,
    target: Tensor,
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
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Cross-entropy between logits and class-index or class-probability targets.

    Same arguments (in the same order), defaults, semantics and exceptions as
    ``torch.nn.functional.cross_entropy``, the deprecated ``size_average``/``reduce`` included. The
    loss is computed by fused kernels that keep only the per-row log-sum-exp for the backward pass.
    Under autocast, float16/bfloat16 logits are computed in float32, as torch does.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, ..., dk); floating point.
        target: class indices (int64 or uint8) of shape (), (N,) or (N, d1, ..., dk), or class
            probabilities of the input's shape.
        weight: optional per-class weights of shape (C,), in the input's dtype.
        size_average, reduce: deprecated (torch's legacy rules and warning); use ``reduction``.
        ignore_index: a target value that contributes neither loss nor gradient (index targets).
        reduction: "none", "mean" or "sum".
        label_smoothing: amount of smoothing in [0, 1].
        lse_square_scale: the z-loss (PaLM): ``lse_square_scale * lse**2`` per row, lse the row's
            log-sum-exp, 0 for ignored rows, added to the loss and reduced with it ("mean"
            averages it over the non-ignored rows, without class weights, as Liger-Kernel and
            flash-attn do).
        softcap: logit soft-capping (Gemma 2): the logits pass through ``softcap * tanh(x /
            softcap)`` inside the kernels (never materialised) before everything else, the
            log-sum-exp and the z-loss included; the gradient goes through the tanh exactly.
            ``None`` (the default) is off; otherwise a finite number > 0.
        return_z_loss: also return the z-loss term, reduced like the loss (included in the loss).
        return_lse: also return each row's log-sum-exp (the unreduced loss's shape; float32 for
            float16/bfloat16/float32 logits, float64 for float64), differentiable.
        backend: "auto" (C++ on CPU, Triton on CUDA), "cpp", "triton" or "torch".
        process_group: vocabulary parallelism (flash-attn's name): ``input`` holds this rank's
            contiguous slice of the classes (ranks in order, slices of any size), ``target`` the
            global class indices (the same on every rank) or this rank's slice of the class
            probabilities, ``weight`` the whole (V,) vector. Every rank returns the loss of the
            whole logits and gets its slice of the gradient (softmax_ext.parallel). A DTensor
            ``input`` sharded on the class dim of a 1-D mesh takes this path by itself.

    Returns:
        The loss; with ``return_z_loss`` and/or ``return_lse``, a tuple (loss, z_loss, lse) of
        those asked for, in that order.
    """
    if process_group is not None or _is_dtensor(input):
        from . import parallel as _parallel

        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        return _parallel.cross_entropy(
            input,
            target,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
            lse_square_scale,
            softcap,
            return_z_loss,
            return_lse,
            backend,
            process_group,
        )
    # The checks below run on every training step: at a 256 x 10 batch each costs a noticeable
    # share of the step, hence the cheap common cases first.
    _check_backend(backend)
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    extras = bool(lse_square_scale) or return_z_loss or return_lse
    if extras:
        _check_lse_square_scale(lse_square_scale)
    if softcap is not None:
        _check_softcap(softcap)

    def with_extras(loss: Tensor, lse: Tensor, index_target: Optional[Tensor]):
        # reduction and input as they are when called (normalised, promoted)
        return _with_lse_terms(
            loss,
            lse,
            index_target,
            ignore_index,
            reduction,
            lse_square_scale,
            return_z_loss,
            return_lse,
            input.dtype,
        )

    if _torch_serves(backend):
        if softcap is not None:
            input = input.div(softcap).tanh().mul(softcap)
        loss = F.cross_entropy(
            input, target, weight, None, ignore_index, None, reduction, label_smoothing
        )
        return with_extras(loss, _torch_lse(input), target) if extras else loss
    # ValueError for an unknown reduction; 'elementwise_mean' warns and means 'mean', as in torch
    reduction_enum = _Reduction.get_enum(reduction)
    reduction = _REDUCTIONS[reduction_enum]
    if label_smoothing != label_smoothing:  # NaN: torch applies smoothing only when it is > 0
        label_smoothing = 0.0
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(
            f"ignore_index must fit in a 64-bit signed integer (as torch's), got {ignore_index}"
        )
    if (
        input.dtype in _HALF_TYPES
        or target.dtype in _HALF_TYPES
        or (weight is not None and weight.dtype in _HALF_TYPES)
    ):
        input, target = _autocast_fp32(input), _autocast_fp32(target)
        weight = _autocast_fp32(weight)
    if input.dim() == 0:
        raise RuntimeError("cross_entropy: input must have a class dimension, got a 0-d tensor")
    _check_floating(input, "cross_entropy")
    if target.device != input.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found input on {input.device} "
            f"and target on {target.device}"
        )
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    soft = target.shape == input.shape
    if soft:
        if not target.is_floating_point():
            raise RuntimeError(
                "Expected floating point type for target with class probabilities, got "
                f"{_dtype_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
    elif not (  # the usual (N, C) logits with (N,) int64 targets need no further check
        input.dim() == 2
        and target.dim() == 1
        and target.dtype is torch.long
        and target.shape[0] == input.shape[0]
    ):
        _index_target_checks(input, target)
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != n_classes:
            raise RuntimeError(
                f"weight tensor should be defined either for all {n_classes} classes or no "
                f"classes but got weight tensor of shape: {list(weight.shape)}"
            )
        if weight.dtype != input.dtype and not soft:  # soft targets promote, as in torch
            raise RuntimeError(
                f"expected scalar type {_dtype_name(input.dtype)} but found "
                f"{_dtype_name(weight.dtype)}"
            )
        if weight.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found input on "
                f"{input.device} and weight on {weight.device}"
            )
        if weight.requires_grad and torch.is_grad_enabled() and not soft:
            # torch's nll_loss has no gradient for the class weights either (soft targets do)
            raise RuntimeError(
                "The function 'nll_loss_forward' is not differentiable with respect to argument "
                "'weight'. This input cannot have requires_grad True."
            )

    if soft:
        dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        input, target = input.to(dtype), target.to(dtype)
        if n_classes == 0:  # nothing for a kernel to do: torch's -0 per row, NaN mean
            loss = F.cross_entropy(input, target, weight, reduction=reduction)
            # no classes: nothing to cap
            return with_extras(loss, _torch_lse(input), None) if extras else loss
    code = backend_code(backend, input.device)
    logits = _rows_view(input)
    # the kernels index the class weights as a contiguous vector
    w = None if weight is None else weight.to(acc_dtype(input.dtype)).contiguous()
    options = _ops.LossOptions(
        ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing),
        reduction=reduction_enum,
        lse_square_scale=float(lse_square_scale),
        softcap=0.0 if softcap is None else float(softcap),
    )
    if soft:
        loss, lse = _ce_soft_op(logits, _rows_view(target), w, *options, code)
    else:
        rows_target = target
        if target.dim() != 1 or target.dtype != torch.long:  # skip two no-op calls per step
            rows_target = target.reshape(-1).long()
        loss, lse = _ce_index_op(logits, rows_target, w, *options, code)
    if reduction == "none" or extras:
        row_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
        if reduction == "none":
            loss = loss.reshape(row_shape)
        if extras:
            lse = lse.reshape(row_shape).to(acc_dtype(input.dtype))
            return with_extras(loss, lse, None if soft else target)
    return loss  # in the logits' dtype already (the operator rounds it once)


def _is_dtensor(t: Tensor) -> bool:
    # a type check without importing torch.distributed.tensor on every call
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def _parallel_prepare(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    backend: str,
) -> dict:
    """The local argument checks and views of the vocabulary-parallel path (softmax_ext.parallel
    runs them before its first collective and raises their error on every rank). The checks are
    cross_entropy's, with ``input`` one slice of the classes: the weight's length and the
    targets' range are checked against the whole vocabulary after the metadata exchange."""
    _check_backend(backend)
    if backend == "torch":
        raise NotImplementedError(
            "softmax_ext.cross_entropy: backend='torch' has no process_group path; use 'auto'"
        )
    _check_lse_square_scale(lse_square_scale)
    if softcap is not None:
        _check_softcap(softcap)
    reduction = _REDUCTIONS[_Reduction.get_enum(reduction)]
    if label_smoothing != label_smoothing:
        label_smoothing = 0.0
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(
            f"ignore_index must fit in a 64-bit signed integer (as torch's), got {ignore_index}"
        )
    input, target, weight = _autocast_fp32(input), _autocast_fp32(target), _autocast_fp32(weight)
    if input.dim() == 0:
        raise RuntimeError("cross_entropy: input must have a class dimension, got a 0-d tensor")
    _check_floating(input, "cross_entropy")
    if target.device != input.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found input on {input.device} "
            f"and target on {target.device}"
        )
    soft = target.shape == input.shape and target.is_floating_point()
    if soft:
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        target = target.to(input.dtype)
    elif target.is_floating_point():
        raise RuntimeError(
            "softmax_ext.cross_entropy(process_group=...): class probabilities must have the "
            f"shape of this rank's logits {list(input.shape)}, got {list(target.shape)}"
        )
    else:
        _index_target_checks(input, target)
    if weight is not None:
        if weight.dim() != 1:
            raise RuntimeError(
                "weight tensor should be defined either for all classes or no classes but got "
                f"weight tensor of shape: {list(weight.shape)}"
            )
        if weight.dtype != input.dtype and not soft:
            raise RuntimeError(
                f"expected scalar type {_dtype_name(input.dtype)} but found "
                f"{_dtype_name(weight.dtype)}"
            )
        if weight.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found input on "
                f"{input.device} and weight on {weight.device}"
            )
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "softmax_ext.cross_entropy(process_group=...): no gradient for the class weights "
                "(each rank would hold only its slice's share of it); pass a weight that does "
                "not require grad"
            )
    row_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size()
    return {
        "logits": _rows_view(input),
        "rows_target": _rows_view(target) if soft else target.reshape(-1).long(),
        "weight": weight,
        "soft": soft,
        "code": backend_code(backend, input.device),
        "row_shape": row_shape,
        "reduction": reduction,
        "label_smoothing": float(label_smoothing),
    }


def _parallel_finish(
    loss: Tensor,
    lse: Tensor,
    denom: Optional[Tensor],
    index_target: Optional[Tensor],
    row_shape: torch.Size,
    out_dtype: torch.dtype,
    ignore_index: int,
    reduction: str,
    lse_square_scale: float,
    return_z_loss: bool,
    return_lse: bool,
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Reduce the per-row float64 losses of the vocabulary-parallel path as torch does (a weighted
    mean divides by ``denom``, the counted targets' weights; soft targets by the rows), round once
    and add the extras, as :func:`cross_entropy` does."""
    if reduction == "none":
        loss = loss.reshape(row_shape)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.sum() / (denom if denom is not None else loss.numel())
    acc = acc_dtype(out_dtype)
    if not (lse_square_scale or return_z_loss or return_lse):
        return loss.to(out_dtype)
    loss = loss.to(acc if lse_square_scale else out_dtype)
    target = None if index_target is None else index_target.reshape(row_shape)
    return _with_lse_terms(
        loss,
        lse.reshape(row_shape).to(acc),
        target,
        ignore_index,
        reduction,
        lse_square_scale,
        return_z_loss,
        return_lse,
        out_dtype,
    )


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without ever
    holding the logits: rows are processed in chunks (one matmul into a reused buffer, the fused
    cross-entropy kernels, the chunk's gradient folded into the input and weight gradients).

    Same names, defaults and semantics as ``torch.nn.functional.linear_cross_entropy`` (its
    ``ignore_index=None`` means -100) for 2-D weights, plus the extras of :func:`cross_entropy`.

    Args:
        input: (..., H), as ``nn.Linear`` takes it; floating point.
        linear_weight: (V, H), the projection onto V classes; the input's dtype.
        target: class indices of the leading shape (...), int64 or uint8, or class probabilities
            (..., V).
        linear_bias: optional (V,).
        weight, reduction, ignore_index, label_smoothing, lse_square_scale, softcap,
        return_z_loss, return_lse: as in :func:`cross_entropy` (the class dim is the last).
        chunk_size: rows per chunk; by default chosen from V and the dtype so that one chunk's
            logits take 1/10 of the whole logits and at most 256 MiB.
        backend: "auto" (C++ kernels on CPU, Triton on CUDA), "cpp", "triton" or "torch" (torch's
            unfused ops).
        process_group: vocabulary parallelism: ``linear_weight`` (and ``linear_bias``) hold this
            rank's contiguous rows of the (V, H) projection, ranks in order; ``input`` and
            class-index targets are the same on every rank, class probabilities this rank's
            slice; ``weight`` the whole (V,) vector. Every rank gets the loss over the whole
            vocabulary, the full input gradient and its slice's weight and bias gradients
            (softmax_ext.parallel).

    Returns:
        The loss in the input's dtype; with ``return_z_loss`` and/or ``return_lse``, a tuple
        (loss, z_loss, lse) of those asked for. Gradients flow to ``input``, ``linear_weight``,
        ``linear_bias`` and class-probability targets; the weight and bias gradients of float16 and
        bfloat16 accumulate in float32.
    """
    ignore_index = -100 if ignore_index is None else ignore_index
    if process_group is not None:
        from . import parallel as _parallel

        return _parallel.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias,
            weight,
            reduction,
            ignore_index,
            label_smoothing,
            lse_square_scale,
            softcap,
            return_z_loss,
            return_lse,
            chunk_size,
            backend,
            process_group,
        )
    _check_backend(backend)
    reduction = _REDUCTIONS[_Reduction.get_enum(reduction)]
    _check_lse_square_scale(lse_square_scale)
    if softcap is not None:
        _check_softcap(softcap)
    soft = _check_linear_ce_args(input, linear_weight, linear_bias, target, weight)
    n_classes, hidden = linear_weight.shape
    row_shape = input.shape[:-1]
    if _torch_serves(backend):
        logits = F.linear(input, linear_weight, linear_bias).reshape(-1, n_classes)
        out = cross_entropy(
            logits,
            target.reshape(-1, n_classes) if soft else target.reshape(-1),
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale,
            softcap=softcap,
            return_z_loss=return_z_loss,
            return_lse=return_lse,
            backend="torch",
        )
        return _linear_outputs(out, row_shape, reduction)
    if label_smoothing != label_smoothing:
        label_smoothing = 0.0
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "softmax_ext.linear_cross_entropy is not differentiable with respect to the class "
            "weights 'weight'; this input cannot have requires_grad True"
        )
    x = input.reshape(-1, hidden)
    t = target.reshape(-1, n_classes) if soft else target.reshape(-1).long()
    if soft and n_classes > 1 and t.stride(1) != 1:
        t = t.contiguous()
    w = None if weight is None else weight.to(acc_dtype(input.dtype)).contiguous()
    options = _ops.LossOptions(
        ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing),
        reduction=_REDUCTIONS.index(reduction),
        lse_square_scale=float(lse_square_scale),
        softcap=0.0 if softcap is None else float(softcap),
    )
    # Which gradients the forward computes right away (bits: input, weight, bias): those that
    # will be asked for, when the loss is the only output and reduced (its gradient is then a
    # scalar multiple of what the forward can compute); else backward recomputes the chunks.
    fold = 0
    if (
        torch.is_grad_enabled()
        and reduction != "none"
        and not (return_lse or return_z_loss)
        and not (soft and target.requires_grad)
    ):
        for bit, p in enumerate((input, linear_weight, linear_bias)):
            if p is not None and p.requires_grad:
                fold |= 1 << bit
    code = backend_code(backend, input.device)
    loss, lse, *_ = _linear_ce_op(
        x, linear_weight, linear_bias, t, w, *options, chunk_size or 0, fold, code
    )
    out = [loss.to(input.dtype)]
    if return_z_loss:
        z = _z_loss(lse, None if soft else t, ignore_index, reduction, lse_square_scale)
        out.append(z.to(input.dtype))
    if return_lse:
        out.append(lse)
    return _linear_outputs(out[0] if len(out) == 1 else tuple(out), row_shape, reduction)


def _linear_outputs(out, row_shape: torch.Size, reduction: str):
    """Per-row results (reduction "none", the log-sum-exp) in the input's leading shape."""
    if isinstance(out, Tensor):
        return out.reshape(row_shape) if reduction == "none" else out
    loss, *rest = out
    if reduction == "none":
        loss = loss.reshape(row_shape)
    return (loss, *(r.reshape(row_shape) if r.dim() == 1 else r for r in rest))


def _check_linear_ce_args(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
) -> bool:
    """torch's checks of linear_cross_entropy's tensors (its exception types and messages);
    returns whether ``target`` holds class probabilities."""
    _check_floating(input, "linear_cross_entropy")
    if input.dim() == 0:
        raise RuntimeError("linear_cross_entropy: input must have a feature dimension, got 0-d")
    if linear_weight.dim() < 2:
        raise RuntimeError(
            f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}"
        )
    if linear_weight.dim() > 2:
        raise NotImplementedError(
            "softmax_ext.linear_cross_entropy: K-dimensional linear weights (C, d1, ..., H) are "
            "not supported; give the input the extra dims instead: (N, d1, ..., H) with a "
            "(C, H) weight"
        )
    n_classes, hidden = linear_weight.shape
    if input.shape[-1] != hidden:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), got "
            f"{input.shape[-1]} and {hidden}, respectively"
        )
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise RuntimeError(
                f"expected m1 and m2 to have the same dtype, but got: "
                f"{_c10_name(input.dtype)} != {_c10_name(t.dtype)}"
            )
        if t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found input on "
                f"{input.device} and {name} on {t.device}"
            )
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes,):
        raise RuntimeError(
            f"expected linear_bias shape ({n_classes},), got {tuple(linear_bias.shape)}"
        )
    if target.device != input.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found input on {input.device} "
            f"and target on {target.device}"
        )
    row_shape = tuple(input.shape[:-1])
    soft = tuple(target.shape) == (*row_shape, n_classes) and target.is_floating_point()
    if not soft:
        if target.is_floating_point() or target.dtype not in (torch.long, torch.uint8):
            raise RuntimeError(
                f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}"
            )
        if tuple(target.shape) != row_shape:
            if row_shape and target.dim() and target.shape[0] != row_shape[0]:
                raise ValueError(
                    f"Expected input batch_size ({row_shape[0]}) to match target batch_size "
                    f"({target.shape[0]})."
                )
            raise RuntimeError(
                f"Expected target size {list(row_shape)} (class indices) or "
                f"{[*row_shape, n_classes]} (class probabilities), got {list(target.shape)}"
            )
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != n_classes:
            raise RuntimeError(
                f"weight tensor should be defined either for all {n_classes} classes or no "
                f"classes but got weight tensor of shape: {list(weight.shape)}"
            )
        if weight.dtype != input.dtype:
            raise RuntimeError(
                f"expected scalar type {_dtype_name(input.dtype)} but found "
                f"{_dtype_name(weight.dtype)}"
            )
        if weight.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found input on "
                f"{input.device} and weight on {weight.device}"
            )
    if soft and target.dtype != input.dtype:
        raise RuntimeError(
            f"expected class-probability target of the input's dtype {input.dtype}, got "
            f"{target.dtype}"
        )
    return soft


def _c10_name(dtype: torch.dtype) -> str:
    """The names c10 prints for dtypes in mm's messages ("float", "double", "c10::Half")."""
    return {
        torch.float32: "float",
        torch.float64: "double",
        torch.float16: "c10::Half",
        torch.bfloat16: "c10::BFloat16",
    }.get(dtype, str(dtype))


def _torch_lse(input: Tensor) -> Tensor:
    """Each row's log-sum-exp from torch's ops, in the accumulation dtype (the class dim is 1, or 0
    for a (C,) input): the extras of the paths that do not run the operators."""
    return input.to(acc_dtype(input.dtype)).logsumexp(1 if input.dim() > 1 else 0)


def _check_softcap(softcap: float) -> None:
    if not (
        isinstance(softcap, (int, float))
        and not isinstance(softcap, bool)
        and 0.0 < softcap < float("inf")
    ):
        raise ValueError(
            f"softcap must be None or a finite number > 0 (logits become softcap * tanh(x / "
            f"softcap)), got {softcap!r}"
        )


def _check_lse_square_scale(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and 0.0 <= scale < float("inf")):
        raise ValueError(
            f"lse_square_scale must be a finite number >= 0 (the z-loss weight), got {scale!r}"
        )


def _with_lse_terms(
    loss: Tensor,
    lse: Tensor,
    target: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    lse_square_scale: float,
    return_z_loss: bool,
    return_lse: bool,
    out_dtype: torch.dtype,
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """The z-loss and log-sum-exp extras of :func:`cross_entropy`, from the per-row ``lse``.

    ``target`` holds class indices (rows whose target is ``ignore_index`` get no z-loss) or is
    None (soft targets: every row counts). Built from torch ops on (rows,) tensors, so autograd
    carries their gradient into the operator's log-sum-exp output. With a z-loss the operators'
    loss comes in the accumulation dtype: loss + z-loss is rounded to ``out_dtype`` once.
    """
    z = None
    if lse_square_scale or return_z_loss:
        z = _z_loss(lse, target, ignore_index, reduction, lse_square_scale)
        if lse_square_scale:
            loss = (loss + z.to(loss.dtype)).to(out_dtype)
        z = z.to(out_dtype)
    out = [loss]
    if return_z_loss:
        out.append(z)
    if return_lse:
        out.append(lse)
    return out[0] if len(out) == 1 else tuple(out)


def _z_loss(
    lse: Tensor, target: Optional[Tensor], ignore_index: int, reduction: str, scale: float
) -> Tensor:
    """The z-loss ``scale * lse**2`` per row, 0 where ``target`` (class indices) is
    ``ignore_index``, reduced: "mean" over the rows that count (unweighted), "sum", or per row."""
    z_rows = lse.square() * scale
    if target is not None and not target.is_floating_point():
        counted = target != ignore_index
        z_rows = torch.where(counted, z_rows, torch.zeros_like(z_rows))
        n_counted = counted.sum()
    else:
        n_counted = z_rows.numel()
    if reduction == "none":
        return z_rows
    if reduction == "sum":
        return z_rows.sum()
    return z_rows.sum() / n_counted


def _softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include "
        "dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_common(
    input: Tensor,
    dim: Optional[int],
    stacklevel: int,
    dtype: Optional[torch.dtype],
    backend: str,
    log: bool,
) -> Tensor:
    _check_backend(backend)
    if dim is None:
        # torch counts from its F.softmax; one more frame here (this function) to the caller's
        dim = _softmax_dim("log_softmax" if log else "softmax", input.dim(), stacklevel + 1)
    if _torch_serves(backend):
        fn = F.log_softmax if log else F.softmax
        return fn(input, dim, dtype=dtype)
    if (
        dtype is None
        and input.dtype in _HALF_TYPES
        and input.device.type == "cuda"
        and torch.is_autocast_enabled("cuda")
    ):
        # torch's CUDA autocast runs softmax and log_softmax in float32 (on CPU it leaves them)
        dtype = torch.float32
    if dtype is not None:
        input = input.to(dtype)
    _check_floating(input, "log_softmax" if log else "softmax")
    ndim = max(input.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
            f"but got {dim})"
        )
    dim = dim % ndim
    code = backend_code(backend, input.device)
    if input.dim() == 0:
        return _softmax_op(input.reshape(1), 0, log, code).reshape(())
    return _softmax_op(input, dim, log, code)


def softmax(
    input: Tensor,
    dim: Optional[int] = None,
    _stacklevel: int = 3,
    dtype: Optional[torch.dtype] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Softmax along ``dim``, as ``torch.nn.functional.softmax`` (same arguments in the same
    order; ``dtype`` casts the input; ``_stacklevel`` places the implicit-dim warning)."""
    return _softmax_common(input, dim, _stacklevel, dtype, backend, log=False)


def log_softmax(
    input: Tensor,
    dim: Optional[int] = None,
    _stacklevel: int = 3,
    dtype: Optional[torch.dtype] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Log-softmax along ``dim``, as ``torch.nn.functional.log_softmax`` (same arguments)."""
    return _softmax_common(input, dim, _stacklevel, dtype, backend, log=True)

"""autograd Functions of softmax_ext: each forward and backward calls the torch.library operators.

Cross-entropy forwards save only the logits (already alive in the caller's graph), the targets and
O(rows) statistics; never an N x C probability tensor. Reductions happen inside the Function, so the
backward receives one scalar and hands the kernels a stride-0 per-row scale.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor


def _reduce(loss_rows: Tensor, reduction: str, denom: Union[Tensor, int, None]) -> Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / denom


def _row_scale(
    grad: Tensor, reduction: str, rows: int, denom: Union[Tensor, int, None], coef: float
) -> Tensor:
    """Per-row d loss / d row-loss: grad itself ('none') or a stride-0 expansion of a scalar.

    Written to launch as few tensor ops as possible: at the Fashion-MNIST batch size (256 x 10)
    per-op overhead, not arithmetic, is the cost.
    """
    if reduction == "mean":
        grad = grad / denom
    if coef != 1.0:
        grad = grad * coef
    return grad if reduction == "none" else grad.expand(rows)


class _NoSecondDerivative(torch.autograd.Function):
    """Stands between a gradient computed without a graph and its use in one (backward with
    create_graph=True): differentiating through it raises instead of silently giving no
    second-order term. ``like`` is the input that needs a gradient, so that a graph exists even
    when the incoming gradient needs none (torch's ``once_differentiable`` keys on the latter)."""

    @staticmethod
    def forward(ctx: Any, grad: Tensor, like: Tensor) -> Tensor:
        return grad.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor):
        raise RuntimeError(
            "softmax_ext: softmax and cross_entropy have no second derivative "
            "(double backward); use backend='torch' where one is needed"
        )


def _first_order_only(backward):
    """Run a Function's backward without a graph; under create_graph, guard its gradients."""

    def wrapped(ctx: Any, *grads: Tensor):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not create_graph:
            return out
        like = ctx.saved_tensors[0]
        return tuple(
            _NoSecondDerivative.apply(g, like) if isinstance(g, Tensor) else g for g in out
        )

    return wrapped


class CrossEntropyIndex(torch.autograd.Function):
    """Cross-entropy of (rows, C) logits against int64 class indices, reduced as asked."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
        kernels: Any,
    ) -> Tensor:
        with_smooth = label_smoothing > 0.0
        nll, smooth, lse = kernels.ce_index_fwd(logits, target, weight, ignore_index, with_smooth)
        n_classes = logits.shape[1]
        rows = (
            (1.0 - label_smoothing) * nll + (label_smoothing / n_classes) * smooth
            if with_smooth
            else nll
        )
        denom = None
        if reduction == "mean":
            valid = target != ignore_index
            if weight is None:
                denom = valid.sum()  # int64; dividing a float by it promotes, with no cast op
            else:
                # clamp, not where(valid, ...): on CUDA an out-of-range target must not make
                # gather assert (the kernels report it as a NaN loss instead; see README)
                denom = (weight.gather(0, target.clamp(0, n_classes - 1)) * valid).sum()
        ctx.save_for_backward(logits, target, weight, lse, denom)
        ctx.meta = (ignore_index, label_smoothing, reduction, kernels)
        return _reduce(rows, reduction, denom)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad: Tensor):
        logits, target, weight, lse, denom = ctx.saved_tensors
        ignore_index, eps, reduction, kernels = ctx.meta
        n_rows, n_classes = logits.shape
        with_smooth = eps > 0.0
        g_nll = _row_scale(grad, reduction, n_rows, denom, 1.0 - eps)
        g_smooth = (
            _row_scale(grad, reduction, n_rows, denom, eps / n_classes) if with_smooth else g_nll
        )
        grad_logits = kernels.ce_index_bwd(
            g_nll, g_smooth, logits, target, weight, lse, ignore_index, with_smooth
        )
        return grad_logits, None, None, None, None, None, None


class CrossEntropySoft(torch.autograd.Function):
    """Cross-entropy of (rows, C) logits against (rows, C) class probabilities."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        label_smoothing: float,
        reduction: str,
        kernels: Any,
    ) -> Tensor:
        loss, lse, tsum = kernels.ce_soft_fwd(logits, target, weight, label_smoothing)
        # PyTorch divides a soft-target mean by the number of rows, weighted or not. Kept as the
        # size itself (not a tensor made from it), so that it stays symbolic under torch.compile.
        denom = logits.shape[0] if reduction == "mean" else None
        ctx.save_for_backward(logits, target, weight, lse, tsum)
        ctx.meta = (label_smoothing, reduction, kernels, denom)
        return _reduce(loss, reduction, denom)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad: Tensor):
        logits, target, weight, lse, tsum = ctx.saved_tensors
        eps, reduction, kernels, denom = ctx.meta
        g_rows = _row_scale(grad, reduction, logits.shape[0], denom, 1.0)
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = kernels.ce_soft_bwd(g_rows, logits, target, weight, lse, tsum, eps)
        grad_weight = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # Rare (distillation with a learned teacher, learned class weights), so plain tensor
            # ops on an N x C temporary rather than a kernel:
            #   d loss / d target[c] = (1 - eps) * w[c] * (lse - x[c]) * g
            #   d loss / d w[c] = sum over rows of q[c] * (lse - x[c]) * g, q the smoothed target
            neg_logp = lse.unsqueeze(1) - logits.to(lse.dtype)
            if ctx.needs_input_grad[2]:
                q = target.to(lse.dtype) * (1.0 - eps) + eps / logits.shape[1]
                grad_weight = (neg_logp * q * g_rows.unsqueeze(1)).sum(0).to(weight.dtype)
            if ctx.needs_input_grad[1]:
                if weight is not None:
                    neg_logp = neg_logp * weight
                grad_target = (neg_logp * (g_rows.unsqueeze(1) * (1.0 - eps))).to(target.dtype)
        return grad_logits, grad_target, grad_weight, None, None, None


class Softmax(torch.autograd.Function):
    """softmax or log_softmax along ``dim``; the backward uses only the forward's output."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, dim: int, log: bool, kernels: Any) -> Tensor:
        out = kernels.softmax_fwd(input.contiguous(), dim, log)
        ctx.save_for_backward(out)
        ctx.meta = (dim, log, kernels)
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad: Tensor):
        (out,) = ctx.saved_tensors
        dim, log, kernels = ctx.meta
        return kernels.softmax_bwd(grad.contiguous(), out, dim, log), None, None, None

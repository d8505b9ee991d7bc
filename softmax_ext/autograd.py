"""autograd Functions of softmax_ext: each forward and backward calls the torch.library operators.

Cross-entropy forwards save only the logits (already alive in the caller's graph), the targets and
O(rows) statistics; never an N x C probability tensor. Reductions happen inside the Function, so the
backward receives one scalar and hands the kernels a stride-0 per-row scale.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
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


def _create_graph() -> bool:
    """Whether this backward must itself be differentiable (backward with create_graph=True)."""
    return torch.is_grad_enabled()


def _torch_ce_backward(ctx: Any, grad: Tensor, loss_fn) -> tuple:
    """The backward of a cross-entropy Function as torch's own, for create_graph=True.

    ``loss_fn(logits, target, weight)`` recomputes the Function's output with torch's differentiable
    ops; differentiating it with create_graph gives exactly torch's second derivatives (and
    gradients with respect to the incoming gradient). Only double backward pays for this: the
    first-order path never builds a graph and uses the kernels.
    """
    inputs = ctx.saved_tensors[:3]
    wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
    loss = loss_fn(*inputs)
    found = torch.autograd.grad(
        loss, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True
    )
    out = [None] * 3
    for i, g in zip(wanted, found, strict=True):
        out[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(out)


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
    def backward(ctx: Any, grad: Tensor):
        ignore_index, eps, reduction, kernels = ctx.meta
        if _create_graph():
            return (
                *_torch_ce_backward(
                    ctx,
                    grad,
                    lambda x, t, w: F.cross_entropy(
                        x.to(grad.dtype), t, w, None, ignore_index, None, reduction, eps
                    ),
                ),
                None,
                None,
                None,
                None,
            )
        logits, target, weight, lse, denom = ctx.saved_tensors
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
    def backward(ctx: Any, grad: Tensor):
        eps, reduction, kernels, denom = ctx.meta
        if _create_graph():
            return (
                *_torch_ce_backward(
                    ctx,
                    grad,
                    lambda x, t, w: F.cross_entropy(
                        x.to(grad.dtype),
                        t.to(grad.dtype),
                        w,
                        reduction=reduction,
                        label_smoothing=eps,
                    ),
                ),
                None,
                None,
                None,
            )
        logits, target, weight, lse, tsum = ctx.saved_tensors
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
    def backward(ctx: Any, grad: Tensor):
        (out,) = ctx.saved_tensors
        dim, log, kernels = ctx.meta
        if _create_graph():
            # differentiable in grad and in out (which leads back here, first order, for x)
            if log:
                grad_in = grad - out.exp() * grad.sum(dim, keepdim=True)
            else:
                grad_in = out * (grad - (grad * out).sum(dim, keepdim=True))
            return grad_in, None, None, None
        return kernels.softmax_bwd(grad.contiguous(), out, dim, log), None, None, None

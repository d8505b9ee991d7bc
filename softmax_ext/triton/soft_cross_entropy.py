"""Cross-entropy against class-probability (soft) targets: Triton kernels beside their launchers.

Logits and targets are (rows, C) with unit class stride and any row stride, in the same dtype.
With smoothing eps the kernels use q = (1 - eps) * target + eps / C without materialising it. Of
the option block (ops.LossOptions) only label_smoothing concerns them: there is no index to ignore,
and the autograd node reduces.
"""

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    acc_dtype,
    aligned,
    check_dtype,
    check_grad_out,
    check_weight,
    finite_shift,
    load_logits,
    loss_options,
    lse_to_f64,
    num_warps,
    on_device,
    online_lse_update,
    rows_online_lse,
    smoothing_factors,
    soft_capped,
    softcap_factors,
    split_lse,
    tile_shape,
    unit_class_stride,
    upcast,
    upcast_scalar,
    vector_width,
)


@triton.jit
def _ce_soft_fwd_kernel(
    x_ptr,
    stride_x,
    q_ptr,
    stride_q,
    w_ptr,
    loss_ptr,
    lse_ptr,
    tsum_ptr,
    n_rows,
    C,
    keep: tl.float64,
    spread: tl.float64,
    cap: tl.float64,
    inv_cap: tl.float64,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IS_F64: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    C = aligned(C, VEC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x_rows = x_ptr + rows * aligned(stride_x, VEC)
    q_rows = q_ptr + rows * aligned(stride_q, VEC)
    keep, spread = upcast_scalar(keep, IS_F64), upcast_scalar(spread, IS_F64)
    cols = tl.arange(0, BLOCK_C)
    m = upcast(tl.full([BLOCK_R], float("-inf"), tl.float32), IS_F64)
    s = upcast(tl.zeros([BLOCK_R], tl.float32), IS_F64)
    tsum = upcast(tl.zeros([BLOCK_R], tl.float32), IS_F64)
    loss = upcast(tl.zeros([BLOCK_R], tl.float32), IS_F64)
    if SINGLE:
        mask = row_ok[:, None] & (cols[None, :] < C)
        x = load_logits(
            x_rows[:, None] + cols[None, :], mask, float("-inf"), cap, inv_cap, HAS_SOFTCAP, IS_F64
        )
        wq = upcast(tl.load(q_rows[:, None] + cols[None, :], mask=mask, other=0.0), IS_F64)
        wq = wq * keep + spread
        if HAS_WEIGHT:
            wq = tl.load(w_ptr + cols, mask=cols < C, other=0.0)[None, :] * wq
        m, s = online_lse_update(m, s, x, mask)
        shift = finite_shift(m)
        log_s = tl.log(s)
        # Literal w * q * (lse - x): a zero target on a -inf logit gives NaN, as in PyTorch.
        loss = tl.sum(tl.where(mask, wq * ((shift[:, None] - x) + log_s[:, None]), 0.0), axis=1)
        tsum = tl.sum(tl.where(mask, wq, 0.0), axis=1)
    else:
        m, s = rows_online_lse(x_rows, row_ok, C, m, s, cap, inv_cap, HAS_SOFTCAP, IS_F64, BLOCK_C)
        shift = finite_shift(m)
        log_s = tl.log(s)
        # Second pass with the final lse (see cross_entropy.py for why not one pass).
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_ok[:, None] & (c[None, :] < C)
            x = load_logits(
                x_rows[:, None] + c[None, :], mask, 0.0, cap, inv_cap, HAS_SOFTCAP, IS_F64
            )
            wq = upcast(tl.load(q_rows[:, None] + c[None, :], mask=mask, other=0.0), IS_F64)
            wq = wq * keep + spread
            if HAS_WEIGHT:
                wq = tl.load(w_ptr + c, mask=c < C, other=0.0)[None, :] * wq
            loss += tl.sum(
                tl.where(mask, wq * ((shift[:, None] - x) + log_s[:, None]), 0.0), axis=1
            )
            tsum += tl.sum(tl.where(mask, wq, 0.0), axis=1)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse_to_f64(m, log_s), mask=row_ok)
    tl.store(tsum_ptr + rows, tsum, mask=row_ok)


@triton.jit
def _ce_soft_bwd_kernel(
    g_ptr,
    stride_g,
    x_ptr,
    stride_x,
    q_ptr,
    stride_q,
    w_ptr,
    lse_ptr,
    stride_lse,
    tsum_ptr,
    stride_tsum,
    glse_ptr,
    stride_glse,
    gx_ptr,
    n_rows,
    C,
    keep: tl.float64,
    spread: tl.float64,
    cap: tl.float64,
    inv_cap: tl.float64,
    HAS_WEIGHT: tl.constexpr,
    HAS_GLSE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    C = aligned(C, VEC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x_rows = x_ptr + rows * aligned(stride_x, VEC)
    q_rows = q_ptr + rows * aligned(stride_q, VEC)
    gx_rows = gx_ptr + rows * C
    keep, spread = upcast_scalar(keep, IS_F64), upcast_scalar(spread, IS_F64)
    g = upcast(tl.load(g_ptr + rows * stride_g, mask=row_ok, other=0.0), IS_F64)
    hi, lo = split_lse(tl.load(lse_ptr + rows * stride_lse, mask=row_ok, other=0.0), IS_F64)
    tsum = upcast(tl.load(tsum_ptr + rows * stride_tsum, mask=row_ok, other=0.0), IS_F64)
    # coefficient of p: g * tsum from the loss, plus the log-sum-exp output's own gradient
    p_coef = g * tsum
    if HAS_GLSE:
        p_coef += upcast(tl.load(glse_ptr + rows * stride_glse, mask=row_ok, other=0.0), IS_F64)
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c[None, :] < C)
        x = upcast(tl.load(x_rows[:, None] + c[None, :], mask=mask, other=float("-inf")), IS_F64)
        wq = upcast(tl.load(q_rows[:, None] + c[None, :], mask=mask, other=0.0), IS_F64)
        wq = wq * keep + spread
        if HAS_WEIGHT:
            wq = tl.load(w_ptr + c, mask=c < C, other=0.0)[None, :] * wq
        # The loss's logits z: x itself, or cap * tanh(x / cap) with slope dz/dx.
        z, slope = soft_capped(x, cap, inv_cap, HAS_SOFTCAP, IS_F64)
        p = tl.exp((z - hi[:, None]) - lo[:, None])
        if HAS_GLSE:
            grad = p_coef[:, None] * p - g[:, None] * wq
        else:  # as before, bit for bit
            grad = g[:, None] * (tsum[:, None] * p - wq)
        if HAS_SOFTCAP:
            grad *= slope
        tl.store(gx_rows[:, None] + c[None, :], grad.to(gx_ptr.dtype.element_ty), mask=mask)


def _check_target(target: Tensor, logits: Tensor) -> None:
    if target.shape != logits.shape or target.dtype != logits.dtype:
        raise ValueError(
            f"softmax_ext (triton): soft target must match logits {tuple(logits.shape)} "
            f"{logits.dtype}, got {tuple(target.shape)} {target.dtype}"
        )


def ce_soft_fwd(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], *options: Union[int, float]
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, tsum) of (rows, C) ``logits`` against (rows, C) probabilities.

    ``options`` is the schema's option block (ops.LossOptions), of which label_smoothing eps is
    used: q = (1 - eps) * target + eps / C; loss = sum_c w[c] q[c] (lse - x[c]);
    tsum = sum_c w[c] q[c]. loss and tsum are in the accumulation dtype, lse in float64.
    """
    o = loss_options(options)
    check_dtype(logits, "logits")
    _check_target(target, logits)
    check_weight(weight, logits)
    logits, target = unit_class_stride(logits), unit_class_stride(target)
    n_rows, n_classes = logits.shape
    acc = acc_dtype(logits.dtype)
    loss, tsum = (logits.new_empty((n_rows,), dtype=acc) for _ in range(2))
    lse = logits.new_empty((n_rows,), dtype=torch.float64)
    if n_rows == 0:
        return loss, lse, tsum
    block_r, block_c, single = tile_shape(n_rows, n_classes, o.softcap)
    with on_device(logits):
        _ce_soft_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            logits,
            logits.stride(0),
            target,
            target.stride(0),
            logits if weight is None else weight,
            loss,
            lse,
            tsum,
            n_rows,
            n_classes,
            *smoothing_factors(o.label_smoothing, n_classes),
            *softcap_factors(o.softcap),
            HAS_WEIGHT=weight is not None,
            HAS_SOFTCAP=bool(o.softcap),
            IS_F64=acc == torch.float64,
            SINGLE=single,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            VEC=vector_width(logits.element_size(), n_classes, logits.stride(0), target.stride(0)),
            num_warps=num_warps(block_r, block_c, o.softcap),
        )
    return loss, lse, tsum


def ce_soft_bwd(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    tsum: Tensor,
    grad_lse: Optional[Tensor],
    *options: Union[int, float],
) -> Tensor:
    """d/dlogits of sum_i grad_loss[i] * loss[i] + grad_lse[i] * lse[i]:
    (g * tsum + grad_lse) * p - g * w * q, p = exp(x - lse).

    ``grad_loss`` is (rows,) in the accumulation dtype and may be a stride-0 expansion of a scalar;
    ``grad_lse`` is (rows,) or None; ``lse`` and ``tsum`` are the forward's; ``options`` as in
    :func:`ce_soft_fwd`. Returns contiguous (rows, C) in the logits' dtype.
    """
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _soft_bwd(grad_loss, logits, target, weight, lse, tsum, grad_lse, grad, *options)
    return grad


def ce_soft_bwd_into(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    tsum: Tensor,
    grad_lse: Optional[Tensor],
    grad: Tensor,
    *options: Union[int, float],
) -> None:
    """:func:`ce_soft_bwd` into ``grad``: contiguous, of the logits' shape and dtype, and either
    the logits themselves (each tile is loaded before its gradient is stored) or disjoint from
    them."""
    check_grad_out(grad, logits, target, weight, lse, tsum, grad_lse, grad_loss)
    _soft_bwd(grad_loss, logits, target, weight, lse, tsum, grad_lse, grad, *options)


def _soft_bwd(grad_loss, logits, target, weight, lse, tsum, grad_lse, grad, *options) -> None:
    """The backward into ``grad`` (a fresh tensor, or one check_grad_out has passed)."""
    o = loss_options(options)
    check_dtype(logits, "logits")
    _check_target(target, logits)
    check_weight(weight, logits)
    logits, target = unit_class_stride(logits), unit_class_stride(target)
    n_rows, n_classes = logits.shape
    if grad.numel() == 0:
        return
    lse = lse.to(torch.float64)
    block_r, block_c, _ = tile_shape(n_rows, n_classes, o.softcap)
    with on_device(logits):
        _ce_soft_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
            grad_loss,
            grad_loss.stride(0),
            logits,
            logits.stride(0),
            target,
            target.stride(0),
            logits if weight is None else weight,
            lse,
            lse.stride(0),
            tsum,
            tsum.stride(0),
            tsum if grad_lse is None else grad_lse,
            0 if grad_lse is None else grad_lse.stride(0),
            grad,
            n_rows,
            n_classes,
            *smoothing_factors(o.label_smoothing, n_classes),
            *softcap_factors(o.softcap),
            HAS_WEIGHT=weight is not None,
            HAS_GLSE=grad_lse is not None,
            HAS_SOFTCAP=bool(o.softcap),
            IS_F64=logits.dtype == torch.float64,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            VEC=vector_width(logits.element_size(), n_classes, logits.stride(0), target.stride(0)),
            num_warps=num_warps(block_r, block_c, o.softcap),
        )

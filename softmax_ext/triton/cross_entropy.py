"""Cross-entropy against class-index targets: Triton kernels beside their launchers.

Logits are (rows, C) with unit class stride and any row stride; targets are int64 (rows,) with any
stride. Each program takes BLOCK_R rows; rows wider than the class block use an online
log-sum-exp over class blocks. Out-of-range targets: on CPU (the interpreter) the launcher raises
IndexError like PyTorch; on CUDA the kernels never read out of bounds and never synchronise: the
row's loss and gradient become NaN, and ``tl.device_assert`` fires when Triton's debug mode is on.

Label smoothing eps mixes the target's term with the mean over classes: per row,
loss = (1 - eps) * nll + (eps / C) * smooth, nll = w[t] * (lse - x[t]) and
smooth = sum_c w[c] * (lse - x[c]). The kernels take eps as the runtime scalars (1 - eps, eps / C)
(``_common.smoothing_factors``); the constexpr WITH_SMOOTH (eps > 0) leaves the smoothing out
entirely otherwise, so that the loss is then nll itself, bit for bit.
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
    check_targets,
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
def _load_targets(t_ptr, stride_t, rows, row_ok, C, ignore_index):
    """Targets of ``rows``, whether each is ignored, in range, and a safe in-bounds index."""
    t = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=0)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < C) & ~ignored
    tl.device_assert(in_range | ignored | ~row_ok, "softmax_ext: target out of bounds")
    return tl.where(in_range, t, 0), ignored, in_range


@triton.jit
def _ce_index_fwd_kernel(
    x_ptr,
    stride_x,
    t_ptr,
    stride_t,
    w_ptr,
    loss_ptr,
    lse_ptr,
    n_rows,
    C,
    ignore_index,
    keep: tl.float64,
    spread: tl.float64,
    cap: tl.float64,
    inv_cap: tl.float64,
    HAS_WEIGHT: tl.constexpr,
    WITH_SMOOTH: tl.constexpr,
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
    cols = tl.arange(0, BLOCK_C)
    m = upcast(tl.full([BLOCK_R], float("-inf"), tl.float32), IS_F64)
    s = upcast(tl.zeros([BLOCK_R], tl.float32), IS_F64)
    smooth = upcast(tl.zeros([BLOCK_R], tl.float32), IS_F64)
    if SINGLE:
        mask = row_ok[:, None] & (cols[None, :] < C)
        x = load_logits(
            x_rows[:, None] + cols[None, :], mask, float("-inf"), cap, inv_cap, HAS_SOFTCAP, IS_F64
        )
        m, s = online_lse_update(m, s, x, mask)
        shift = finite_shift(m)
        log_s = tl.log(s)
        if WITH_SMOOTH:
            # Literal w * (lse - x): a weight-0 -inf logit gives NaN, as in PyTorch.
            term = (shift[:, None] - x) + log_s[:, None]
            if HAS_WEIGHT:
                term = tl.load(w_ptr + cols, mask=cols < C, other=0.0)[None, :] * term
            smooth = tl.sum(tl.where(mask, term, 0.0), axis=1)
    else:
        m, s = rows_online_lse(x_rows, row_ok, C, m, s, cap, inv_cap, HAS_SOFTCAP, IS_F64, BLOCK_C)
        shift = finite_shift(m)
        log_s = tl.log(s)
        if WITH_SMOOTH:
            # A second pass needs the final lse; summing w * x in the first pass instead would
            # cancel catastrophically for large logits.
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cols
                mask = row_ok[:, None] & (c[None, :] < C)
                x = load_logits(
                    x_rows[:, None] + c[None, :], mask, 0.0, cap, inv_cap, HAS_SOFTCAP, IS_F64
                )
                term = (shift[:, None] - x) + log_s[:, None]
                if HAS_WEIGHT:
                    term = tl.load(w_ptr + c, mask=c < C, other=0.0)[None, :] * term
                smooth += tl.sum(tl.where(mask, term, 0.0), axis=1)
    # The target's logit and weight only now: kept live across the class loops they were spilled.
    t, ignored, in_range = _load_targets(t_ptr, stride_t, rows, row_ok, C, ignore_index)
    x_t = load_logits(x_rows + t, row_ok & in_range, 0.0, cap, inv_cap, HAS_SOFTCAP, IS_F64)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t, mask=row_ok & in_range, other=0.0)
    else:
        w_t = 1.0
    nll = w_t * ((shift - x_t) + log_s)
    loss = tl.where(ignored, 0.0, tl.where(in_range, nll, float("nan")))
    if WITH_SMOOTH:
        smooth = tl.where(ignored, 0.0, smooth)
        loss = upcast_scalar(keep, IS_F64) * loss + upcast_scalar(spread, IS_F64) * smooth
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse_to_f64(m, log_s), mask=row_ok)


@triton.jit
def _ce_index_bwd_kernel(
    g_ptr,
    stride_g,
    x_ptr,
    stride_x,
    t_ptr,
    stride_t,
    w_ptr,
    wsum_ptr,
    lse_ptr,
    stride_lse,
    glse_ptr,
    stride_glse,
    gx_ptr,
    n_rows,
    C,
    ignore_index,
    keep: tl.float64,
    spread: tl.float64,
    cap: tl.float64,
    inv_cap: tl.float64,
    HAS_WEIGHT: tl.constexpr,
    WITH_SMOOTH: tl.constexpr,
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
    gx_rows = gx_ptr + rows * C
    t, ignored, in_range = _load_targets(t_ptr, stride_t, rows, row_ok, C, ignore_index)
    hi, lo = split_lse(tl.load(lse_ptr + rows * stride_lse, mask=row_ok, other=0.0), IS_F64)
    # One gradient per row scales both terms: grad_nll = (1 - eps) g, grad_smooth = (eps / C) g.
    # Without smoothing grad_nll is g itself, not g * 1.0, bit for bit.
    scale = upcast(tl.load(g_ptr + rows * stride_g, mask=row_ok, other=0.0), IS_F64)
    if WITH_SMOOTH:
        g_smooth = upcast_scalar(spread, IS_F64) * scale
        scale = upcast_scalar(keep, IS_F64) * scale
        if HAS_WEIGHT:
            w_total = upcast(tl.load(wsum_ptr), IS_F64)
        else:
            w_total = upcast(tl.zeros([1], tl.float64) + C, IS_F64)
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + t, mask=row_ok & in_range, other=0.0)
    if HAS_GLSE:  # the log-sum-exp output's gradient: glse * p, ignored rows included
        glse = upcast(tl.load(glse_ptr + rows * stride_glse, mask=row_ok, other=0.0), IS_F64)
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c[None, :] < C)
        x = upcast(tl.load(x_rows[:, None] + c[None, :], mask=mask, other=float("-inf")), IS_F64)
        # The loss's logits z: x itself, or cap * tanh(x / cap) with slope dz/dx.
        z, slope = soft_capped(x, cap, inv_cap, HAS_SOFTCAP, IS_F64)
        p = tl.exp((z - hi[:, None]) - lo[:, None])
        # p - onehot stays in the accumulation dtype until the final store (exact near p = 1).
        # torch's scale * p - scale * onehot is NaN at the target when the target's weight is
        # infinite; scale - scale (0, or NaN for an infinite scale) adds that case alone.
        hit = c[None, :] == t[:, None]
        grad = scale[:, None] * (p - tl.where(hit, 1.0, 0.0))
        grad += tl.where(hit, (scale - scale)[:, None], 0.0)
        if WITH_SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + c, mask=c < C, other=0.0)[None, :]
            else:
                w = 1.0
            grad += g_smooth[:, None] * (w_total * p - w)
        grad = tl.where(ignored[:, None], 0.0, tl.where(in_range[:, None], grad, float("nan")))
        if HAS_GLSE:
            grad += tl.where(mask, glse[:, None] * p, 0.0)
        if HAS_SOFTCAP:
            grad *= slope
        tl.store(gx_rows[:, None] + c[None, :], grad.to(gx_ptr.dtype.element_ty), mask=mask)


def ce_index_fwd(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], *options: Union[int, float]
) -> Tuple[Tensor, Tensor]:
    """Per-row (loss, lse) of (rows, C) ``logits`` against int64 ``target``.

    ``options`` is the schema's option block (ops.LossOptions: ignore_index, label_smoothing,
    reduction; the reduction is the autograd node's). loss = (1 - eps) * w[t] * (lse - x[t]) +
    (eps / C) * sum_c w[c] * (lse - x[c]), only the first term (unscaled) when eps is not > 0;
    rows whose target is ignore_index get 0. loss is in the accumulation dtype (float64 for float64
    logits, float32 otherwise), lse always in float64.
    """
    o = loss_options(options)
    check_dtype(logits, "logits")
    check_weight(weight, logits)
    logits = unit_class_stride(logits)
    n_rows, n_classes = logits.shape
    check_targets(target, n_classes, o.ignore_index)
    loss = logits.new_empty((n_rows,), dtype=acc_dtype(logits.dtype))
    lse = logits.new_empty((n_rows,), dtype=torch.float64)
    if n_rows == 0:
        return loss, lse
    block_r, block_c, single = tile_shape(n_rows, n_classes, o.softcap)
    with on_device(logits):
        _ce_index_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            logits,
            logits.stride(0),
            target,
            target.stride(0),
            logits if weight is None else weight,
            loss,
            lse,
            n_rows,
            n_classes,
            o.ignore_index,
            *smoothing_factors(o.label_smoothing, n_classes),
            *softcap_factors(o.softcap),
            HAS_WEIGHT=weight is not None,
            WITH_SMOOTH=o.label_smoothing > 0.0,
            HAS_SOFTCAP=bool(o.softcap),
            IS_F64=logits.dtype == torch.float64,
            SINGLE=single,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            VEC=vector_width(logits.element_size(), n_classes, logits.stride(0)),
            num_warps=num_warps(block_r, block_c, o.softcap),
        )
    return loss, lse


def ce_index_bwd(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_lse: Optional[Tensor],
    *options: Union[int, float],
) -> Tensor:
    """d/dlogits of sum_i grad_loss[i] * loss[i] + grad_lse[i] * lse[i], ``loss`` as in
    :func:`ce_index_fwd` (``grad_lse`` None: no second term; it adds grad_lse * p to every row,
    ignored rows included).

    With g = grad_loss[i], p = exp(x - lse) and W = sum(w): grad = (1 - eps) g w[t] (p - onehot(t))
    + (eps / C) g (W p - w), only g w[t] (p - onehot(t)) when eps is not > 0; ignored rows get
    exactly 0. ``grad_loss`` is (rows,) in the accumulation dtype and may be a stride-0 expansion of
    a scalar; ``lse`` is the forward's (float64). Returns contiguous (rows, C) in the logits' dtype.
    """
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _index_bwd(grad_loss, logits, target, weight, lse, grad_lse, grad, *options)
    return grad


def ce_index_bwd_into(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_lse: Optional[Tensor],
    grad: Tensor,
    *options: Union[int, float],
) -> None:
    """:func:`ce_index_bwd` into ``grad``: contiguous, of the logits' shape and dtype, and either
    the logits themselves (each tile is loaded before its gradient is stored) or disjoint from
    them."""
    check_grad_out(grad, logits, target, weight, lse, grad_lse, grad_loss)
    _index_bwd(grad_loss, logits, target, weight, lse, grad_lse, grad, *options)


def _index_bwd(grad_loss, logits, target, weight, lse, grad_lse, grad, *options) -> None:
    """The backward into ``grad`` (a fresh tensor, or one check_grad_out has passed)."""
    o = loss_options(options)
    check_dtype(logits, "logits")
    check_weight(weight, logits)
    logits = unit_class_stride(logits)
    n_rows, n_classes = logits.shape
    check_targets(target, n_classes, o.ignore_index)
    if grad.numel() == 0:
        return
    lse = lse.to(torch.float64)
    with_smooth = o.label_smoothing > 0.0
    # sum(w) as a device tensor: no host synchronisation.
    wsum = weight.sum() if (weight is not None and with_smooth) else lse
    block_r, block_c, _ = tile_shape(n_rows, n_classes, o.softcap)
    with on_device(logits):
        _ce_index_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
            grad_loss,
            grad_loss.stride(0),
            logits,
            logits.stride(0),
            target,
            target.stride(0),
            logits if weight is None else weight,
            wsum,
            lse,
            lse.stride(0),
            lse if grad_lse is None else grad_lse,
            0 if grad_lse is None else grad_lse.stride(0),
            grad,
            n_rows,
            n_classes,
            o.ignore_index,
            *smoothing_factors(o.label_smoothing, n_classes),
            *softcap_factors(o.softcap),
            HAS_WEIGHT=weight is not None,
            WITH_SMOOTH=with_smooth,
            HAS_GLSE=grad_lse is not None,
            HAS_SOFTCAP=bool(o.softcap),
            IS_F64=logits.dtype == torch.float64,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            VEC=vector_width(logits.element_size(), n_classes, logits.stride(0)),
            num_warps=num_warps(block_r, block_c, o.softcap),
        )

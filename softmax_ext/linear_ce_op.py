"""The fused linear + cross-entropy operator: ``cross_entropy(input @ W.T + b, target)`` without
the (rows, V) logits.

``softmax_ext::linear_cross_entropy`` walks the rows in chunks. Per chunk: one matmul into a
reused (chunk, V) buffer, the cross-entropy row kernels of ``softmax_ext.ops`` on it (C++ on CPU,
Triton on CUDA: the same kernels as ``cross_entropy``), and, when the gradient is already known
to be needed ("fold"), the chunk's gradient right away: ``dlogits @ W`` into grad_input and
``dlogits.T @ x`` into an fp32 (float64 for float64) grad_weight accumulator, so that backward only
scales them by the loss's gradient. Otherwise (reduction "none", or the log-sum-exp / z-loss
outputs asked for, whose gradients come only in backward) backward recomputes the chunks. A
second derivative (``create_graph=True``) recomputes through torch's differentiable ops on the
whole logits (the only path that materialises them).

The operator's loss includes the z-loss (``lse_square_scale``), reduced like the loss: its
gradient then travels with the loss's. Everything else (argument checks, shapes, the returned
extras) is ``softmax_ext.functional.linear_cross_entropy``'s.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops as _ops
from .ops import NAMESPACE, LossOptions, acc_dtype

#: Bytes of one (chunk, V) logits buffer that the automatic chunk size never exceeds.
CHUNK_BYTES = 256 << 20
#: The automatic chunk takes this share of one whole logits tensor. The chunk's gradient overwrites
#: its logits (the backward kernels' ``_into`` variants), so one buffer is all the chunk holds, and
#: larger chunks run the matmuls faster: the thin ones (and the weight-gradient update, a read and
#: write of the whole accumulator per chunk) are what costs at large vocabularies.
MAX_CHUNK_SHARE = 1 / 10
#: ... unless it is below this size anyway (small problems run in one chunk or a few).
SMALL_CHUNK_BYTES = 1 << 20
#: Rows of the smallest automatic chunk (matmuls below this lose most of their speed).
MIN_CHUNK_ROWS = 16
#: Half-precision chunks update the float32 weight gradient from float32 copies of this many bytes
#: at most, a block of classes at a time: a copy of the whole chunk would be twice the chunk.
HALF_COPY_BYTES = 16 << 20

OP_NAME = "linear_cross_entropy"
_SCHEMA = (
    f"(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
    f"{_ops.OPTIONS}, int chunk_size, int fold, int backend) -> "
    "(Tensor loss, Tensor lse, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)"
)

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define(OP_NAME + _SCHEMA)
_QUALNAME = f"{NAMESPACE}::{OP_NAME}"


def chunk_rows(rows: int, classes: int, element_size: int, chunk_size: Optional[int]) -> int:
    """Rows per chunk: ``chunk_size`` when given (at most ``rows``), else as many rows as fit in
    :data:`CHUNK_BYTES` and in :data:`MAX_CHUNK_SHARE` of the logits (or in
    :data:`SMALL_CHUNK_BYTES`, whichever is larger), at least :data:`MIN_CHUNK_ROWS` and a
    multiple of 16 (the C++ kernels' row block)."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), rows))
    row_bytes = max(1, classes * element_size)
    budget = min(CHUNK_BYTES, max(SMALL_CHUNK_BYTES, rows * row_bytes * MAX_CHUNK_SHARE))
    n = max(MIN_CHUNK_ROWS, int(budget // row_bytes) // 16 * 16)
    return max(1, min(n, rows))


def fold_mask(fold: int) -> Tuple[bool, bool, bool]:
    """The operator's ``fold`` argument as (input, weight, bias): which gradients the forward
    computes (bit 0, 1, 2); 0 leaves them all to backward."""
    return bool(fold & 1), bool(fold & 2), bool(fold & 4)


def _kernels(soft: bool, code: int) -> Tuple[object, object]:
    """(forward kernel, backward kernel writing into a given tensor) for the target kind."""
    prefix = "ce_soft" if soft else "ce_index"
    return _ops.kernel(prefix + "_fwd", code), _ops.kernel(prefix + "_bwd_into", code)


def _logits_into(out: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x @ w.T (+ b) into ``out``, (rows, V) contiguous."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


def _counted(target: Tensor, o: LossOptions) -> Optional[Tensor]:
    """Rows that count (index targets: not ignore_index); None for soft targets (all rows)."""
    return None if target.is_floating_point() else target != o.ignore_index


def _ce_scale(target: Tensor, weight: Optional[Tensor], o: LossOptions, acc: torch.dtype) -> Tensor:
    """The factor of each row's loss in the reduced loss, as a 0-d tensor (no host
    synchronisation): 1 for "sum"; for "mean" 1 / (the sum of the counted rows' class weights),
    or 1 / rows for soft targets, as torch divides."""
    one = torch.ones((), dtype=acc, device=target.device)
    if o.reduction != 1:
        return one
    if target.is_floating_point():
        return one / target.shape[0]
    counted = target != o.ignore_index
    if weight is None:
        return one / counted.sum().to(acc)
    w_t = weight.gather(0, torch.where(counted, target, 0))
    return one / torch.where(counted, w_t, 0).sum()


def _z_rows_scale(target: Tensor, o: LossOptions, acc: torch.dtype) -> Tensor:
    """The factor of each row's z-loss in the reduced z-loss (0-d): 1 for "sum", 1 / counted rows
    for "mean" (unweighted, as Liger-Kernel and flash-attn)."""
    one = torch.ones((), dtype=acc, device=target.device)
    if o.reduction != 1:
        return one
    counted = _counted(target, o)
    return one / (target.shape[0] if counted is None else counted.sum().to(acc))


def _z_rows(lse: Tensor, target: Tensor, o: LossOptions) -> Tensor:
    """lse_square_scale * lse^2 per row, 0 on rows that do not count."""
    z = lse.square() * o.lse_square_scale
    counted = _counted(target, o)
    return z if counted is None else torch.where(counted, z, torch.zeros_like(z))


def _z_lse_grad(lse: Tensor, target: Tensor, o: LossOptions, g_rows: Tensor) -> Tensor:
    """d/dlse of the z-loss part of sum_i g_rows[i] * loss[i] (g_rows already holds the z
    reduction's factor): 2 * scale * lse * g on counted rows."""
    glse = 2.0 * o.lse_square_scale * lse * g_rows
    counted = _counted(target, o)
    return glse if counted is None else torch.where(counted, glse, torch.zeros_like(glse))


class _Grads:
    """Accumulators of the input, weight and bias gradients over the chunks (None where not
    needed); weight and bias gradients accumulate in the accumulation dtype."""

    def __init__(self, x: Tensor, w: Tensor, b: Optional[Tensor], need: Sequence[bool]) -> None:
        acc = acc_dtype(x.dtype)
        self.input = torch.empty_like(x) if need[0] else None
        self.weight = torch.zeros(w.shape, dtype=acc, device=w.device) if need[1] else None
        self.bias = (
            torch.zeros(w.shape[0], dtype=acc, device=w.device)
            if (need[2] and b is not None)
            else None
        )

    def add_chunk(self, r0: int, r1: int, dz: Tensor, xc: Tensor, w: Tensor) -> None:
        """Fold the chunk's logits gradient ``dz`` (rows r0..r1) into the accumulators."""
        if self.input is not None:
            torch.mm(dz, w, out=self.input[r0:r1])
        if self.weight is not None:
            _add_weight_grad(self.weight, dz, xc)
        if self.bias is not None:
            self.bias += dz.sum(0, dtype=self.bias.dtype)


def _add_weight_grad(acc: Tensor, dz: Tensor, xc: Tensor) -> None:
    """acc += dz.T @ xc with acc in the accumulation dtype. Half factors go through float32
    copies (torch has no half x half -> float32 matmul on CPU; products of two half values are
    exact in float32, so the result is the float32 GEMM's), a block of classes at a time: at most
    :data:`HALF_COPY_BYTES` of copy instead of a copy of the chunk at twice its size."""
    if dz.dtype == acc.dtype:
        acc.addmm_(dz.t(), xc)
        return
    x32 = xc.to(acc.dtype)
    rows, classes = dz.shape
    block = max(256, HALF_COPY_BYTES // max(1, rows * acc.element_size()))
    for c0 in range(0, classes, block):
        c1 = min(classes, c0 + block)
        acc[c0:c1].addmm_(dz[:, c0:c1].t().to(acc.dtype), x32)


def _grad_rows(
    target: Tensor, weight: Optional[Tensor], o: LossOptions, acc: torch.dtype, g_loss: Tensor
) -> Tuple[Tensor, Tensor]:
    """(gradient of each row's cross-entropy term, factor of each row's z-loss term) for the
    loss gradient ``g_loss`` (a scalar for "mean"/"sum", per row for "none")."""
    rows = target.shape[0]
    g = g_loss.to(acc)
    if o.reduction == 0:
        return g, g
    ce = (g * _ce_scale(target, weight, o, acc)).expand(rows)
    z = (g * _z_rows_scale(target, o, acc)).expand(rows)
    return ce, z


def _chunk_grad(
    bwd,
    soft: bool,
    opts: LossOptions,
    a: Tensor,
    z: Tensor,
    tc: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    tsum: Optional[Tensor],
    glse: Optional[Tensor],
) -> Tensor:
    """d/dlogits of the chunk (the kernels' backward), in the logits' dtype, written over the
    chunk's logits ``z`` (which it returns): one (chunk, V) buffer serves both."""
    if soft:
        bwd(a, z, tc, weight, lse, tsum, glse, z, *opts)
    else:
        bwd(a, z, tc, weight, lse, glse, z, *opts)
    return z


def _forward(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    lse_square_scale: float,
    softcap: float,
    chunk_size: int,
    fold: int,
    backend: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    o = LossOptions(ignore_index, label_smoothing, reduction, lse_square_scale, softcap)
    soft = target.is_floating_point()
    fwd, bwd = _kernels(soft, backend)
    rows, classes = input.shape[0], linear_weight.shape[0]
    acc = acc_dtype(input.dtype)
    loss_rows = input.new_empty((rows,), dtype=acc)
    lse = input.new_empty((rows,), dtype=torch.float64)
    grads = _Grads(input, linear_weight, linear_bias, fold_mask(fold))
    if fold:
        ce_g, z_g = _grad_rows(target, weight, o, acc, torch.ones((), dtype=acc))
    chunk = chunk_rows(rows, classes, input.element_size(), chunk_size or None)
    buf = input.new_empty((chunk, classes)) if rows else None
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        xc, tc = input[r0:r1], target[r0:r1]
        z = _logits_into(buf[: r1 - r0], xc, linear_weight, linear_bias)
        if soft:
            loss_c, lse_c, tsum_c = fwd(z, tc, weight, *o)
        else:
            (loss_c, lse_c), tsum_c = fwd(z, tc, weight, *o), None
        loss_rows[r0:r1] = loss_c
        lse[r0:r1] = lse_c
        if fold:
            glse = None
            if o.lse_square_scale:
                glse = _z_lse_grad(lse_c.to(acc), tc, o, z_g[r0:r1])
            dz = _chunk_grad(bwd, soft, o, ce_g[r0:r1], z, tc, weight, lse_c, tsum_c, glse)
            grads.add_chunk(r0, r1, dz, xc, linear_weight)
    lse_acc = lse.to(acc)
    loss = _reduce(loss_rows, lse_acc, target, weight, o)
    # unused gradient outputs are distinct empty tensors (outputs must not alias)
    return (
        loss,
        lse_acc,
        input.new_empty((0,)) if grads.input is None else grads.input,
        input.new_empty((0,), dtype=acc) if grads.weight is None else grads.weight,
        input.new_empty((0,), dtype=acc) if grads.bias is None else grads.bias,
    )


def _reduce(
    loss_rows: Tensor, lse: Tensor, target: Tensor, weight: Optional[Tensor], o: LossOptions
) -> Tensor:
    """The loss (cross-entropy plus z-loss), reduced as ``o.reduction`` says, in the
    accumulation dtype."""
    acc = loss_rows.dtype
    if o.reduction == 0:
        loss = loss_rows
        if o.lse_square_scale:
            loss = loss + _z_rows(lse, target, o)
        return loss
    loss = loss_rows.sum() * _ce_scale(target, weight, o, acc)
    if o.lse_square_scale:
        loss = loss + _z_rows(lse, target, o).sum() * _z_rows_scale(target, o, acc)
    return loss


def _fake(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    lse_square_scale: float,
    softcap: float,
    chunk_size: int,
    fold: int,
    backend: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype(input.dtype)
    rows = input.shape[0]
    loss = input.new_empty((rows,) if reduction == 0 else (), dtype=acc)
    lse = input.new_empty((rows,), dtype=acc)
    fx, fw, fb = fold_mask(fold)
    gi = torch.empty_like(input) if fx else input.new_empty((0,))
    gw = input.new_empty(linear_weight.shape if fw else (0,), dtype=acc)
    gb = input.new_empty(
        (linear_weight.shape[0] if fb and linear_bias is not None else 0,), dtype=acc
    )
    return loss, lse, gi, gw, gb


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, w, b, target, weight, *opts, chunk_size, fold, backend = inputs
    _, lse, gi, gw, gb = output
    ctx.opts = LossOptions(*opts)
    ctx.chunk_size, ctx.fold, ctx.backend = chunk_size, fold, backend
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w, b, target, weight, lse)
    # Gradients of unused outputs stay None: materialised they would be zero tensors of the
    # gradient outputs' sizes (a weight-sized one among them) that nothing reads.
    ctx.set_materialize_grads(False)
    # The folded gradients are held on ctx (detached: no reference cycle through their grad_fn),
    # not saved: the first backward scales them in place and hands them over, so that autograd
    # can take them as the .grad tensors instead of a scaled copy of each (a weight-sized buffer).
    ctx.folded = (gi.detach(), gw.detach(), gb.detach()) if fold else None


def _backward(ctx, g_loss: Tensor, g_lse: Optional[Tensor], *_unused) -> tuple:
    x, w, b, target, weight, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    o = ctx.opts
    folded, ctx.folded = ctx.folded, None  # a second backward (retain_graph) recomputes
    if g_loss is None:  # only the log-sum-exp output is differentiated
        shape = (x.shape[0],) if o.reduction == 0 else ()
        g_loss = torch.zeros(shape, dtype=acc_dtype(x.dtype), device=x.device)
    if torch.is_grad_enabled():  # create_graph: a second derivative will be asked for
        grads = _reference_grads(x, w, b, target, weight, o, g_loss, g_lse, need)
    elif (
        folded is not None
        and all(f or not n for f, n in zip(fold_mask(ctx.fold), need[:3], strict=True))
        and not need[3]
    ):
        # every gradient asked for was folded in (the wrapper's choice; else recompute below)
        gi, gw, gb = folded
        del folded
        g = g_loss.to(acc_dtype(x.dtype))
        # In place on plain tensors; a traced backward (torch.compile, AOT: tensor subclasses)
        # must not mutate what the forward returned, and gets the scaled copies.
        eager = type(g_loss) is torch.Tensor and type(gw) is torch.Tensor
        grads = [
            _scaled(gi, g.to(gi.dtype), eager, x.dtype) if need[0] else None,
            _scaled(gw, g, eager, w.dtype) if need[1] else None,
            _scaled(gb, g, eager, b.dtype) if (need[2] and b is not None) else None,
            None,
        ]
        del gi, gw, gb
    else:
        grads = _recompute_grads(x, w, b, target, weight, o, lse, g_loss, g_lse, ctx, need)
    return (*grads, None, *([None] * (len(LossOptions._fields) + 3)))


def _scaled(t: Tensor, g: Tensor, in_place: bool, dtype: torch.dtype) -> Tensor:
    """``t * g`` in ``dtype``, reusing ``t``'s memory when ``in_place``."""
    return (t.mul_(g) if in_place else t * g).to(dtype)


def _recompute_grads(x, w, b, target, weight, o, lse, g_loss, g_lse, ctx, need) -> List:
    """The gradients of the inputs, recomputing each chunk's logits."""
    soft = target.is_floating_point()
    fwd, bwd = _kernels(soft, ctx.backend)
    acc = acc_dtype(x.dtype)
    rows, classes = x.shape[0], w.shape[0]
    ce_g, z_g = _grad_rows(target, weight, o, acc, g_loss)
    glse_all = None
    if o.lse_square_scale:
        glse_all = _z_lse_grad(lse, target, o, z_g)
    if g_lse is not None:
        glse_all = g_lse.to(acc) if glse_all is None else glse_all + g_lse.to(acc)
    grads = _Grads(x, w, b, need)
    g_target = torch.zeros_like(target) if (soft and need[3]) else None
    chunk = chunk_rows(rows, classes, x.element_size(), ctx.chunk_size or None)
    buf = x.new_empty((chunk, classes)) if rows else None
    lse64 = lse.to(torch.float64)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        xc, tc = x[r0:r1], target[r0:r1]
        z = _logits_into(buf[: r1 - r0], xc, w, b)
        tsum = fwd(z, tc, weight, *o)[2] if soft else None
        glse = None if glse_all is None else glse_all[r0:r1]
        if g_target is not None:  # before the logits' gradient overwrites them
            g_target[r0:r1] = _soft_target_grad(z, lse64[r0:r1], weight, o, ce_g[r0:r1])
        dz = _chunk_grad(bwd, soft, o, ce_g[r0:r1], z, tc, weight, lse64[r0:r1], tsum, glse)
        grads.add_chunk(r0, r1, dz, xc, w)
    return [
        grads.input,
        None if grads.weight is None else grads.weight.to(w.dtype),
        None if grads.bias is None else grads.bias.to(b.dtype),
        g_target,
    ]


def _soft_target_grad(
    z: Tensor, lse: Tensor, weight: Optional[Tensor], o: LossOptions, g: Tensor
) -> Tensor:
    """d/dq of sum_i g[i] * loss[i] for soft targets q: g (1 - eps) w (lse - z'), z' the
    (soft-capped) logits."""
    acc = g.dtype
    zc = z.to(acc)
    if o.softcap:
        zc = torch.tanh(zc / o.softcap) * o.softcap
    d = (lse.to(acc)[:, None] - zc) * (g * (1.0 - o.label_smoothing))[:, None]
    if weight is not None:
        d = d * weight
    return d.to(z.dtype)


def _reference_grads(x, w, b, target, weight, o, g_loss, g_lse, need) -> List:
    """Gradients through torch's differentiable ops on the whole logits (create_graph)."""
    from .functional import cross_entropy  # the torch path of the same semantics

    inputs = [t for t, n in zip((x, w, b, target), need[:4], strict=True) if n and t is not None]
    logits = torch.nn.functional.linear(x, w, b)
    loss, lse = cross_entropy(
        logits,
        target,
        weight,
        ignore_index=o.ignore_index,
        reduction=("none", "mean", "sum")[o.reduction],
        label_smoothing=o.label_smoothing,
        lse_square_scale=o.lse_square_scale,
        softcap=o.softcap or None,
        return_lse=True,
        backend="torch",
    )
    outs, gouts = [loss], [g_loss.to(loss.dtype)]
    if g_lse is not None:
        outs.append(lse)
        gouts.append(g_lse.to(lse.dtype))
    got = iter(torch.autograd.grad(outs, inputs, gouts, create_graph=True, allow_unused=True))
    return [
        next(got) if (n and t is not None) else None
        for t, n in zip((x, w, b, target), need[:4], strict=True)
    ]


torch.library.register_kernel(_QUALNAME, ("cpu", "cuda"), _forward, lib=_lib)
torch.library.register_fake(_QUALNAME, _fake, lib=_lib)
torch.library.register_autograd(_QUALNAME, _backward, setup_context=_setup_context, lib=_lib)

#: The operator (its default overload).
linear_cross_entropy_op = getattr(getattr(torch.ops, NAMESPACE), OP_NAME).default

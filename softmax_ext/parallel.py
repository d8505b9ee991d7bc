"""Vocabulary-parallel cross-entropy over torch.distributed (``process_group=``, DTensor inputs).

Each rank holds a contiguous slice of the classes, ranks in order, slices of any size. The loss
of the whole logits comes from per-row partial results of the same fused kernels that serve one
device, combined with torch.distributed (no communication code of our own):

1. one small all-gather of each rank's metadata (rows, classes, target checks, argument errors):
   shard sizes and offsets, and any mismatch raises the same error on every rank (never a hang);
2. the local forward kernel gives each row's local log-sum-exp ``lse_r`` and, with smoothing or
   soft targets, the local weighted sums;
3. an all-reduce MAX of ``lse_r`` gives ``M``, then one all-reduce SUM of a packed (rows, k)
   float64 tensor: ``exp(lse_r - M)``, the target logit (index targets, from the rank that holds
   it) and the smoothing / soft-target sums, each shifted by ``M - lse_r >= 0`` so that no term
   cancels. The global log-sum-exp is ``L = M + log(sum exp(lse_r - M))``.

Backward needs no communication: the local backward kernel, given the global ``L`` instead of the
local log-sum-exp, writes ``softmax(z) * coefficient - (smoothing term)`` for the local slice in
one pass, and the target's one-hot term is an O(rows) scatter. Saved for backward: O(rows) (the
logits are saved by reference, as on one device).

The kernels' option block is reused as it is: a kernel run with label smoothing 1 computes the
smoothing sum ``sum_c w_c (lse_r - z_c)`` alone, and soft targets are smoothed towards ``eps / V``
(the whole vocabulary) by a local smoothing ``eps_l`` and a factor (see :func:`_soft_factors`).
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops as _ops

_INDEX_FIELDS = 3  # packed per row: exp(lse_r - M), target logit, smoothing sum
_SOFT_FIELDS = 3  # packed per row: exp(lse_r - M), shifted weighted loss, weighted target sum


class Shard(NamedTuple):
    """This rank's slice of the classes: ``[offset, offset + size)`` of ``total``."""

    offset: int
    size: int
    total: int
    sizes: Tuple[int, ...]  # every rank's slice size, ranks in order


# ---- metadata exchange: one all-gather, errors raised on every rank ------------------------------

# The int64 metadata of one rank: failed (0/1), rows, local classes, soft (0/1), smallest and
# largest counted target index (index targets), target checksum, weight length (-1: none), dtype.
_META = 9
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def exchange_metadata(
    group,
    device: torch.device,
    check: Callable[[], Tuple[int, int, bool, Optional[Tensor], int, int]],
) -> Tuple[List[List[int]], Optional[BaseException]]:
    """Run the local argument checks ``check`` and all-gather their outcome with every rank.

    ``check`` returns (rows, local classes, soft, counted index targets or None, weight length or
    -1, dtype code) or raises. Every rank takes part in the gather whatever happened locally, so a
    bad argument on one rank cannot leave the others waiting in a collective. Returns every rank's
    metadata row and the local exception (if any); :func:`raise_on_every_rank` turns them into
    one error on every rank.
    """
    err: Optional[BaseException] = None
    meta = torch.zeros(_META, dtype=torch.int64, device=device)
    try:
        rows, classes, soft, counted, wlen, dcode = check()
        values = [0, rows, classes, int(soft), 0, -1, 0, wlen, dcode]
        if counted is not None and counted.numel() > 0:
            # on device: the gather below carries them, so there is one host sync per call
            meta[4] = counted.min()
            meta[5] = counted.max()
            meta[6] = counted.sum()
            values[4:7] = [None, None, None]
        for i, v in enumerate(values):
            if v is not None:
                meta[i] = v
    except Exception as e:  # noqa: BLE001 - re-raised after the gather, on this rank and the others
        err = e
        meta.zero_()
        meta[0] = 1
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    table = torch.stack(gathered).tolist()
    return table, err


def raise_on_every_rank(group, table: List[List[int]], err: Optional[BaseException]) -> None:
    """Raise the same exception on every rank when any rank's checks failed.

    The failing ranks' messages travel with one object all-gather, taken only on this (already
    failed) path, so every rank raises the first failing rank's exception type and message,
    prefixed by its rank.
    """
    failed = [r for r, row in enumerate(table) if row[0]]
    if not failed:
        return
    world = len(table)
    mine = None if err is None else (type(err), str(err))
    messages: List[Optional[Tuple[type, str]]] = [None] * world
    dist.all_gather_object(messages, mine, group=group)
    r = failed[0]
    kind, text = messages[r] if messages[r] is not None else (RuntimeError, "argument check failed")
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = RuntimeError
    raise kind(f"[softmax_ext, process_group rank {r} of {world}] {text}") from err


def shard_of(group, table: List[List[int]], target_is_index: bool) -> Shard:
    """Check the gathered metadata for consistency and return this rank's class slice.

    Every rank runs this on the same table, so a mismatch raises the same error everywhere.
    """
    world = len(table)
    rows = [row[1] for row in table]
    if len(set(rows)) != 1:
        raise ValueError(
            "softmax_ext.cross_entropy(process_group=...): every rank must hold the same rows "
            f"(its slice of the classes of the same logits); rows per rank: {rows}"
        )
    if len({row[3] for row in table}) != 1:
        raise ValueError(
            "softmax_ext.cross_entropy(process_group=...): the ranks disagree on the kind of "
            "target (class indices on some, class probabilities on others)"
        )
    if len({row[8] for row in table}) != 1:
        raise ValueError(
            "softmax_ext.cross_entropy(process_group=...): the ranks' logits have different dtypes"
        )
    sizes = tuple(row[2] for row in table)
    total = sum(sizes)
    if total == 0:
        raise RuntimeError("cross_entropy: the vocabulary is empty on every rank (0 classes)")
    wlens = {row[7] for row in table}
    if wlens != {-1} and wlens != {total}:
        raise RuntimeError(
            f"weight tensor should be defined either for all {total} classes (the whole "
            "vocabulary, on every rank) or no classes but got weight tensors of lengths "
            f"{sorted(wlens)}"
        )
    if target_is_index:
        counted = [row for row in table if row[5] >= 0]
        if counted:
            checks = {(row[4], row[5], row[6]) for row in counted}
            if len(checks) != 1 or len(counted) != world:
                raise ValueError(
                    "softmax_ext.cross_entropy(process_group=...): the class-index targets "
                    "differ across ranks (every rank must pass the same global targets)"
                )
            lo, hi = counted[0][4], counted[0][5]
            if lo < 0 or hi >= total:
                raise IndexError(f"Target {lo if lo < 0 else hi} is out of bounds.")
    rank = dist.get_rank(group)
    return Shard(sum(sizes[:rank]), sizes[rank], total, sizes)


# ---- the per-row partials and their combination --------------------------------------------------


def _options(softcap: float, label_smoothing: float) -> _ops.LossOptions:
    """The local kernels' option block: per-row results (reduction none), our own ignore index."""
    return _ops.LossOptions(
        ignore_index=-100, label_smoothing=label_smoothing, reduction=0, softcap=softcap
    )


def _soft_factors(eps: float, local: int, total: int) -> Tuple[float, float]:
    """(eps_l, lam): a local smoothing eps_l and a factor lam with
    ``lam * ((1 - eps_l) q + eps_l / local) == (1 - eps) q + eps / total`` for every q, so that
    the local soft-target kernel smooths towards the whole vocabulary."""
    if eps == 0.0:
        return 0.0, 1.0
    if eps == 1.0:
        return 1.0, local / total
    rho = (eps / total) / (1.0 - eps)
    return rho * local / (1.0 + rho * local), (1.0 - eps) + eps * local / total


def _capped(z: Tensor, softcap: float) -> Tensor:
    return z if not softcap else torch.tanh(z / softcap) * softcap


def _global_lse(lse_r: Tensor, group) -> Tuple[Tensor, Tensor]:
    """All-reduce MAX of the local log-sum-exps: (M, M where finite else 0) in float64."""
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m, torch.where(torch.isfinite(m), m, torch.zeros_like(m))


class _Config(NamedTuple):
    shard: Shard
    ignore_index: int
    label_smoothing: float
    softcap: float
    code: int  # the kernels' backend code (softmax_ext.ops.backend_code)
    group: object


def _kernel(name: str, cfg: _Config):
    return _ops.kernel(name, cfg.code)


class _IndexCE(torch.autograd.Function):
    """Per-row loss and global log-sum-exp (both float64) of class-index targets, vocab-parallel.

    The local smoothing sum comes from the soft-target kernel run on a zero target row (a stride-0
    view, never materialised) with label smoothing 1: its loss is then ``sum_c w_c (lse_r - z_c) /
    size`` with no target term, whatever the logits (a target logit of -inf would make an index
    kernel's 0 * inf a NaN).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor], cfg: _Config):
        sh, eps = cfg.shard, cfg.label_smoothing
        rows = logits.shape[0]
        counted = target != cfg.ignore_index
        w_local = None if weight is None else weight[sh.offset : sh.offset + sh.size].contiguous()
        if sh.size == 0:
            sums = logits.new_zeros(rows, dtype=torch.float64)
            lse_r = logits.new_full((rows,), -math.inf, dtype=torch.float64)
        elif eps > 0:
            sums, lse_r, _ = _kernel("ce_soft_fwd", cfg)(
                logits, _zero_rows(logits), w_local, *_options(cfg.softcap, 1.0)
            )
        else:  # every row "ignored": the log-sum-exp alone
            _, lse_r = _kernel("ce_index_fwd", cfg)(
                logits, torch.full_like(target, -100), w_local, *_options(cfg.softcap, 0.0)
            )
        owner = counted & (target >= sh.offset) & (target < sh.offset + sh.size)
        local_t = (target - sh.offset).clamp(0, max(sh.size - 1, 0))
        if sh.size > 0:
            zt = _capped(logits.gather(1, local_t[:, None]).squeeze(1).double(), cfg.softcap)
            zt = torch.where(owner, zt, torch.zeros_like(zt))
        else:
            zt = torch.zeros_like(lse_r)
        m, ms = _global_lse(lse_r, cfg.group)
        packed = torch.empty(rows, _INDEX_FIELDS, dtype=torch.float64, device=logits.device)
        packed[:, 0] = torch.exp(lse_r - ms)
        packed[:, 1] = zt
        w_sum_local = float(sh.size) if w_local is None else float(w_local.double().sum())
        if eps > 0:
            # sum_c w_c (M - z_c) over the slice = sums * size + W_r (M - lse_r): non-negative terms
            smooth = sums.double() * sh.size + w_sum_local * (ms - lse_r)
            inf = math.inf if w_sum_local else 0.0  # a slice of -inf logits: -w * -inf
            packed[:, 2] = torch.where(torch.isneginf(lse_r), inf, smooth)
        else:
            packed[:, 2] = 0.0
        dist.all_reduce(packed, group=cfg.group)
        lse = ms + torch.log(packed[:, 0])
        w_t = (
            torch.ones_like(lse)
            if weight is None
            else weight.double()[target.clamp(0, sh.total - 1)]
        )
        w_t = torch.where(counted, w_t, torch.zeros_like(w_t))
        loss = w_t * (lse - packed[:, 1])
        w_all = float(sh.total) if weight is None else float(weight.double().sum())
        if eps > 0:
            # sum over all classes of w_c (L - z_c) = (shifted sums) + W (L - M)
            smooth = packed[:, 2] + w_all * (lse - ms)
            loss = (1.0 - eps) * loss + (eps / sh.total) * smooth
        loss = torch.where(counted, loss, torch.zeros_like(loss))
        ctx.save_for_backward(logits, target, lse, w_t, counted, owner, local_t, w_local)
        ctx.cfg, ctx.w_sums = cfg, (w_sum_local, w_all)
        ctx.mark_non_differentiable(w_t)
        return loss, lse, w_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss: Tensor, g_lse: Tensor, _g_wt):
        logits, target, lse, w_t, counted, owner, local_t, w_local = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        sh, eps = cfg.shard, cfg.label_smoothing
        w_sum_local, w_all = ctx.w_sums
        if not ctx.needs_input_grad[0] or sh.size == 0:
            return None, None, None, None
        acc = _ops.acc_dtype(logits.dtype)
        g = torch.zeros_like(lse) if g_loss is None else g_loss.double()
        g = torch.where(counted, g, torch.zeros_like(g))
        gl = torch.zeros_like(lse) if g_lse is None else g_lse.double()
        # d loss / d z_c = coef * p_c - g eps / V * w_c - g (1 - eps) w_t [c == t], p = exp(z - L)
        coef = g * ((1.0 - eps) * w_t + (eps / sh.total) * w_all) + gl
        if eps > 0:
            # the soft kernel on the zero target row, smoothing 1 and tsum 1:
            # (k_g + k_gl) * p - k_g / size * w_c
            k_g = g * (eps * sh.size / sh.total)
            grad = _kernel("ce_soft_bwd", cfg)(
                k_g.to(acc),
                logits,
                _zero_rows(logits),
                w_local,
                lse,
                torch.ones_like(lse, dtype=acc),
                (coef - k_g).to(acc),
                *_options(cfg.softcap, 1.0),
            )
        else:  # every row "ignored": coef * p alone
            grad = _kernel("ce_index_bwd", cfg)(
                torch.zeros_like(lse, dtype=acc),
                logits,
                torch.full_like(target, -100),
                w_local,
                lse,
                coef.to(acc),
                *_options(cfg.softcap, 0.0),
            )
        # the target's one-hot term, on the rank that holds the target: O(rows)
        onehot = g * (1.0 - eps) * w_t
        if cfg.softcap:
            zt = _capped(logits.gather(1, local_t[:, None]).squeeze(1).double(), cfg.softcap)
            onehot = onehot * (1.0 - (zt / cfg.softcap) ** 2)
        onehot = torch.where(owner, onehot, torch.zeros_like(onehot))
        rows = torch.arange(logits.shape[0], device=logits.device)
        grad.index_put_((rows, local_t), -onehot.to(grad.dtype), accumulate=True)
        return grad, None, None, None


def _zero_rows(logits: Tensor) -> Tensor:
    """A (rows, C) zero target as a stride-0 view of one row (unit class stride)."""
    return logits.new_zeros(1, logits.shape[1]).expand(logits.shape[0], -1)


class _SoftCE(torch.autograd.Function):
    """Per-row loss and global log-sum-exp (float64) of this rank's slice of soft targets."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor], cfg: _Config):
        sh, eps = cfg.shard, cfg.label_smoothing
        rows = logits.shape[0]
        w_local = None if weight is None else weight[sh.offset : sh.offset + sh.size].contiguous()
        eps_l, lam = _soft_factors(eps, sh.size, sh.total)
        if sh.size > 0:
            loss_r, lse_r, tsum_r = _kernel("ce_soft_fwd", cfg)(
                logits, target, w_local, *_options(cfg.softcap, eps_l)
            )
            loss_r, tsum_r = loss_r.double(), tsum_r.double()
        else:
            loss_r = tsum_r = logits.new_zeros(rows, dtype=torch.float64)
            lse_r = logits.new_full((rows,), -math.inf, dtype=torch.float64)
        m, ms = _global_lse(lse_r, cfg.group)
        packed = torch.empty(rows, _SOFT_FIELDS, dtype=torch.float64, device=logits.device)
        packed[:, 0] = torch.exp(lse_r - ms)
        # sum_c w_c q'_c (M - z_c) over the slice: the local loss shifted by M - lse_r >= 0
        shifted = lam * (loss_r + tsum_r * (ms - lse_r))
        packed[:, 1] = torch.where(tsum_r == 0, lam * loss_r, shifted)
        packed[:, 2] = lam * tsum_r
        dist.all_reduce(packed, group=cfg.group)
        lse = ms + torch.log(packed[:, 0])
        tsum = packed[:, 2]
        loss = packed[:, 1] + tsum * (lse - ms)
        ctx.save_for_backward(logits, target, lse, tsum, w_local)
        ctx.cfg, ctx.factors = cfg, (eps_l, lam)
        return loss, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss: Tensor, g_lse: Tensor):
        logits, target, lse, tsum, w_local = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        sh, eps = cfg.shard, cfg.label_smoothing
        eps_l, lam = ctx.factors
        g = torch.zeros_like(lse) if g_loss is None else g_loss.double()
        gl = None if g_lse is None else g_lse.double()
        acc = _ops.acc_dtype(logits.dtype)
        grad_x = grad_t = None
        if ctx.needs_input_grad[0] and sh.size > 0:
            # with lse = L and tsum / lam: g lam (tsum / lam * p - w q_l) = g (tsum p - w q')
            grad_x = _kernel("ce_soft_bwd", cfg)(
                (g * lam).to(acc),
                logits,
                target,
                w_local,
                lse,
                (tsum / lam).to(acc),
                None if gl is None else gl.to(acc),
                *_options(cfg.softcap, eps_l),
            )
        if ctx.needs_input_grad[1] and sh.size > 0:
            # d loss / d q_c = (1 - eps) w_c (L - z_c)
            z = _capped(logits.double(), cfg.softcap)
            grad_t = (lse[:, None] - z) * (g * (1.0 - eps))[:, None]
            if w_local is not None:
                grad_t = grad_t * w_local.double()
            grad_t = grad_t.to(target.dtype)
        return grad_x, grad_t, None, None


# ---- the entry point ------------------------------------------------------------------------------


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    return_z_loss: bool,
    return_lse: bool,
    backend: str,
    process_group,
):
    """softmax_ext.cross_entropy with ``process_group`` (or a DTensor ``input``): see the module
    docstring. ``input`` is this rank's slice of the classes (dim 1, or 0 for a (C,) input)."""
    from torch.distributed.tensor import DTensor

    if isinstance(input, DTensor):
        return _dtensor_cross_entropy(
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
        )
    from . import functional as F_

    group = process_group
    if not dist.is_initialized():
        raise RuntimeError(
            "softmax_ext.cross_entropy(process_group=...): torch.distributed is not initialized"
        )
    state = {}

    def check():
        state.update(
            F_._parallel_prepare(
                input,
                target,
                weight,
                ignore_index,
                reduction,
                label_smoothing,
                lse_square_scale,
                softcap,
                backend,
            )
        )
        p = state
        counted = None
        if not p["soft"]:
            counted = p["rows_target"][p["rows_target"] != ignore_index]
        wlen = -1 if p["weight"] is None else p["weight"].numel()
        return (
            p["logits"].shape[0],
            p["logits"].shape[1],
            p["soft"],
            counted,
            wlen,
            _DTYPE_CODES.get(p["logits"].dtype, 0),
        )

    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    table, err = exchange_metadata(group, device, check)
    raise_on_every_rank(group, table, err)
    p = state
    shard = shard_of(group, table, not p["soft"])
    cfg = _Config(
        shard,
        int(ignore_index),
        float(p["label_smoothing"]),
        0.0 if softcap is None else float(softcap),
        p["code"],
        group,
    )
    logits, w = p["logits"], p["weight"]
    w = None if w is None else w.to(_ops.acc_dtype(logits.dtype)).contiguous()
    if p["soft"]:
        loss, lse = _SoftCE.apply(logits, p["rows_target"], w, cfg)
        denom = None
        index_target = None
    else:
        loss, lse, w_t = _IndexCE.apply(logits, p["rows_target"], w, cfg)
        denom = w_t.sum()
        index_target = p["rows_target"]
    return F_._parallel_finish(
        loss,
        lse,
        denom,
        index_target,
        p["row_shape"],
        input.dtype,
        ignore_index,
        p["reduction"],
        lse_square_scale,
        return_z_loss,
        return_lse,
    )


def _dtensor_cross_entropy(
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
):
    """A DTensor sharded on the class dim of a 1-D mesh: the local slices through the
    process-group path, the results as replicated DTensors (what torch's ``loss_parallel``
    returns)."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor import Shard as DShard

    mesh = input.device_mesh
    class_dim = 1 if input.dim() > 1 else 0
    if mesh.ndim != 1 or tuple(input.placements) != (DShard(class_dim),):
        raise ValueError(
            "softmax_ext.cross_entropy: a DTensor input must be sharded on its class dim "
            f"(Shard({class_dim})) over a 1-D device mesh, got placements {input.placements} on "
            f"a {mesh.ndim}-D mesh"
        )
    local = input.to_local()
    if isinstance(target, DTensor):
        # class probabilities sharded like the logits, or replicated class indices
        target = (
            target.to_local() if target.placements == input.placements else target.full_tensor()
        )
    elif target.shape == input.shape:  # full probabilities: this rank's slice
        target = _slice_like(target, local, class_dim, mesh)
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    out = cross_entropy(
        local,
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
        mesh.get_group(),
    )

    def wrap(t: Tensor):
        return DTensor.from_local(t, mesh, [Replicate()], run_check=False)

    return tuple(wrap(t) for t in out) if isinstance(out, tuple) else wrap(out)


def _slice_like(full: Tensor, local: Tensor, dim: int, mesh) -> Tensor:
    """This rank's slice along ``dim`` of a full tensor, with the sizes DTensor's Shard uses."""
    sizes = [0] * mesh.size()
    n = full.shape[dim]
    chunk = -(-n // mesh.size()) if n else 0
    for r in range(mesh.size()):
        sizes[r] = max(0, min(chunk, n - r * chunk))
    r = mesh.get_local_rank()
    return full.narrow(dim, sum(sizes[:r]), local.shape[dim])

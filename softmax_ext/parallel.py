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

from . import linear_ce_op as _linear_ce
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


def _zero_rows(logits: Tensor) -> Tensor:
    """A (rows, C) zero target as a stride-0 view of one row (unit class stride)."""
    return logits.new_zeros(1, logits.shape[1]).expand(logits.shape[0], -1)


class Config(NamedTuple):
    """What the local computations of one vocabulary-parallel call need besides tensors."""

    shard: Shard
    ignore_index: int
    label_smoothing: float
    softcap: float
    code: int  # the kernels' backend code (softmax_ext.ops.backend_code)
    group: object

    def kernel(self, name: str):
        return _ops.kernel(name, self.code)

    def local_weight(self, weight: Optional[Tensor]) -> Optional[Tensor]:
        """This rank's slice of the whole (V,) class weights (contiguous, accumulation dtype)."""
        if weight is None:
            return None
        return weight[self.shard.offset : self.shard.offset + self.shard.size].contiguous()


def _target_slot(target: Tensor, cfg: Config) -> Tuple[Tensor, Tensor, Tensor]:
    """(counted, owner, local index): rows that count, rows whose target is in this slice, and
    the target's index in the slice (clamped to a valid one elsewhere)."""
    sh = cfg.shard
    counted = target != cfg.ignore_index
    owner = counted & (target >= sh.offset) & (target < sh.offset + sh.size)
    return counted, owner, (target - sh.offset).clamp(0, max(sh.size - 1, 0))


def index_partials(
    logits: Tensor, target: Tensor, w_local: Optional[Tensor], cfg: Config, out: Tensor
) -> None:
    """Local per-row partials of class-index targets into ``out`` (rows, 3) float64: the slice's
    log-sum-exp, the target logit (0 where another rank holds it) and, with smoothing, the
    smoothing sum ``sum_c w_c (lse_r - z_c)`` over the slice.

    The smoothing sum comes from the soft-target kernel run on a zero target row (a stride-0 view,
    never materialised) with label smoothing 1: its loss is then that sum / size with no target
    term, whatever the logits (a target logit of -inf would make an index kernel's 0 * inf NaN).
    """
    sh = cfg.shard
    if sh.size == 0:
        out[:, 0], out[:, 1:] = -math.inf, 0.0
        return
    if cfg.label_smoothing > 0:
        sums, lse_r, _ = cfg.kernel("ce_soft_fwd")(
            logits, _zero_rows(logits), w_local, *_options(cfg.softcap, 1.0)
        )
        out[:, 2] = sums.double() * sh.size
    else:  # every row "ignored" for the kernel: the log-sum-exp alone
        _, lse_r = cfg.kernel("ce_index_fwd")(
            logits, torch.full_like(target, -100), w_local, *_options(cfg.softcap, 0.0)
        )
        out[:, 2] = 0.0
    out[:, 0] = lse_r
    _, owner, local_t = _target_slot(target, cfg)
    zt = _capped(logits.gather(1, local_t[:, None]).squeeze(1).double(), cfg.softcap)
    out[:, 1] = torch.where(owner, zt, torch.zeros_like(zt))


def soft_partials(
    logits: Tensor, target: Tensor, w_local: Optional[Tensor], cfg: Config, out: Tensor
) -> None:
    """Local per-row partials of this slice's class probabilities into ``out`` (rows, 3) float64:
    the slice's log-sum-exp, ``lam * sum_c w_c q'_c (lse_r - z_c)`` and ``lam * sum_c w_c q'_c``
    with q' the targets smoothed towards the whole vocabulary (:func:`_soft_factors`)."""
    sh = cfg.shard
    if sh.size == 0:
        out[:, 0], out[:, 1:] = -math.inf, 0.0
        return
    eps_l, lam = _soft_factors(cfg.label_smoothing, sh.size, sh.total)
    loss_r, lse_r, tsum_r = cfg.kernel("ce_soft_fwd")(
        logits, target, w_local, *_options(cfg.softcap, eps_l)
    )
    out[:, 0] = lse_r
    out[:, 1] = loss_r.double() * lam
    out[:, 2] = tsum_r.double() * lam


def combine(
    partials: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    soft: bool,
    cfg: Config,
    wire: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The whole vocabulary's per-row loss, log-sum-exp L and (index targets) the target's class
    weight (0 on ignored rows; soft targets: the global ``sum_c w_c q'_c``), from every rank's
    partials: an all-reduce MAX of the local log-sum-exps (M), then one all-reduce SUM of the
    packed (rows, 3) partials shifted to M (each shifted term is >= 0: nothing cancels).

    The collectives carry ``wire`` (the kernels' accumulation type: float32 for float32 and half
    inputs, whose kernels sum in float32 anyway, float64 for float64) and the third column only
    where it is used (soft targets, label smoothing): 12 bytes a row for float32 class indices,
    as torch's loss_parallel sends. Every rank shifts by the same reduced M, so its rounding
    to ``wire`` costs nothing."""
    sh, eps = cfg.shard, cfg.label_smoothing
    lse_r = partials[:, 0]
    m = lse_r.to(wire, memory_format=torch.contiguous_format, copy=True)  # a dense copy
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=cfg.group)
    m = m.double()
    ms = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    packed = torch.empty_like(partials)
    packed[:, 0] = torch.exp(lse_r - ms)
    gap = ms - lse_r  # >= 0; +inf for a slice whose row is all -inf
    if soft:
        # lam * sum_c w_c q'_c (M - z_c) over the slice
        shifted = partials[:, 1] + partials[:, 2] * gap
        packed[:, 1] = torch.where(partials[:, 2] == 0, partials[:, 1], shifted)
        packed[:, 2] = partials[:, 2]
    else:
        packed[:, 1] = partials[:, 1]
        if eps > 0:
            w_local = cfg.local_weight(weight)
            w_sum = float(sh.size) if w_local is None else float(w_local.double().sum())
            # sum_c w_c (M - z_c) over the slice; a slice of -inf logits gives +inf (as torch)
            smooth = partials[:, 2] + w_sum * gap
            packed[:, 2] = torch.where(torch.isneginf(lse_r), math.inf if w_sum else 0.0, smooth)
        else:
            packed[:, 2] = 0.0
    columns = 3 if soft or eps > 0 else 2
    sent = packed[:, :columns].to(wire, memory_format=torch.contiguous_format, copy=True)
    dist.all_reduce(sent, group=cfg.group)
    packed[:, :columns] = sent
    lse = ms + torch.log(packed[:, 0])
    if soft:
        return packed[:, 1] + packed[:, 2] * (lse - ms), lse, packed[:, 2]
    counted, _, _ = _target_slot(target, cfg)
    w_t = (
        torch.ones_like(lse) if weight is None else weight.double()[torch.where(counted, target, 0)]
    )
    w_t = torch.where(counted, w_t, torch.zeros_like(w_t))
    loss = w_t * (lse - packed[:, 1])
    if eps > 0:
        w_all = float(sh.total) if weight is None else float(weight.double().sum())
        # the sum over all classes of w_c (L - z_c): the shifted sums + W (L - M)
        loss = (1.0 - eps) * loss + (eps / sh.total) * (packed[:, 2] + w_all * (lse - ms))
    return torch.where(counted, loss, torch.zeros_like(loss)), lse, w_t


def _local_bwd(cfg: "Config", name: str, out: Optional[Tensor], *args) -> Tensor:
    """The local backward kernel ``name`` on ``args`` (the schema's, options last): its result,
    or, with ``out``, written into ``out`` by its ``_into`` variant."""
    if out is None:
        return cfg.kernel(name)(*args)
    n = len(_ops.LossOptions._fields)
    cfg.kernel(name + "_into")(*args[:-n], out, *args[-n:])
    return out


def index_grad(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    w_t: Tensor,
    g: Tensor,
    gl: Optional[Tensor],
    cfg: Config,
    out: Optional[Tensor] = None,
) -> Tensor:
    """d/dlogits of sum_i g[i] loss[i] + gl[i] L[i] for this slice (class-index targets), one
    pass of the local backward kernel given the global L, plus the one-hot term (O(rows)):
    ``coef p_c - g eps / V w_c - g (1 - eps) w_t [c == t]`` with p = exp(z - L). Written into
    ``out`` when given (a contiguous tensor like ``logits``, or ``logits`` itself), else into a
    new tensor."""
    sh, eps = cfg.shard, cfg.label_smoothing
    acc = _ops.acc_dtype(logits.dtype)
    counted, owner, local_t = _target_slot(target, cfg)
    w_local = cfg.local_weight(weight)
    g = torch.where(counted, g.double(), 0.0)
    onehot = g * (1.0 - eps) * w_t
    if cfg.softcap:  # read before ``out`` may overwrite the logits
        zt = _capped(logits.gather(1, local_t[:, None]).squeeze(1).double(), cfg.softcap)
        onehot = onehot * (1.0 - (zt / cfg.softcap) ** 2)
    gl = torch.zeros_like(g) if gl is None else gl.double()
    w_all = float(sh.total) if weight is None else float(weight.double().sum())
    coef = g * ((1.0 - eps) * w_t + (eps / sh.total) * w_all) + gl
    if eps > 0:
        # the soft kernel on the zero target row, smoothing 1 and tsum 1:
        # (k_g + k_gl) p - k_g / size * w_c
        k_g = g * (eps * sh.size / sh.total)
        grad = _local_bwd(
            cfg,
            "ce_soft_bwd",
            out,
            k_g.to(acc),
            logits,
            _zero_rows(logits),
            w_local,
            lse,
            torch.ones_like(lse, dtype=acc),
            (coef - k_g).to(acc),
            *_options(cfg.softcap, 1.0),
        )
    else:  # every row "ignored" for the kernel: coef * p alone
        grad = _local_bwd(
            cfg,
            "ce_index_bwd",
            out,
            torch.zeros_like(lse, dtype=acc),
            logits,
            torch.full_like(target, -100),
            w_local,
            lse,
            coef.to(acc),
            *_options(cfg.softcap, 0.0),
        )
    onehot = torch.where(owner, onehot, torch.zeros_like(onehot))
    rows = torch.arange(logits.shape[0], device=logits.device)
    grad.index_put_((rows, local_t), -onehot.to(grad.dtype), accumulate=True)
    return grad


def soft_grad(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    tsum: Tensor,
    g: Tensor,
    gl: Optional[Tensor],
    cfg: Config,
    out: Optional[Tensor] = None,
) -> Tensor:
    """d/dlogits of sum_i g[i] loss[i] + gl[i] L[i] for this slice of soft targets: the local
    backward kernel given the global L and tsum / lam, with g * lam:
    ``g lam (tsum / lam p - w q_l) = g (tsum p - w q')``. ``out`` as in :func:`index_grad`."""
    eps_l, lam = _soft_factors(cfg.label_smoothing, cfg.shard.size, cfg.shard.total)
    acc = _ops.acc_dtype(logits.dtype)
    return _local_bwd(
        cfg,
        "ce_soft_bwd",
        out,
        (g.double() * lam).to(acc),
        logits,
        target,
        cfg.local_weight(weight),
        lse,
        (tsum / lam).to(acc),
        None if gl is None else gl.to(acc),
        *_options(cfg.softcap, eps_l),
    )


def soft_target_grad(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor, g: Tensor, cfg: Config
) -> Tensor:
    """d/dq of sum_i g[i] loss[i] for this slice of soft targets: (1 - eps) w_c (L - z_c) g."""
    z = _capped(logits.double(), cfg.softcap)
    grad = (lse[:, None] - z) * (g.double() * (1.0 - cfg.label_smoothing))[:, None]
    w_local = cfg.local_weight(weight)
    if w_local is not None:
        grad = grad * w_local.double()
    return grad.to(target.dtype)


class _CrossEntropy(torch.autograd.Function):
    """Per-row loss and log-sum-exp (float64) of the whole vocabulary from this rank's slice."""

    @staticmethod
    def forward(ctx, logits, target, weight, soft: bool, cfg: Config):
        partials = torch.empty(logits.shape[0], 3, dtype=torch.float64, device=logits.device)
        local = soft_partials if soft else index_partials
        local(logits, target, cfg.local_weight(weight), cfg, partials)
        loss, lse, aux = combine(partials, target, weight, soft, cfg, _ops.acc_dtype(logits.dtype))
        ctx.save_for_backward(logits, target, weight, lse, aux)
        ctx.soft, ctx.cfg = soft, cfg
        ctx.mark_non_differentiable(aux)
        return loss, lse, aux

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, g_lse, _g_aux):
        logits, target, weight, lse, aux = ctx.saved_tensors
        cfg: Config = ctx.cfg
        g = torch.zeros_like(lse) if g_loss is None else g_loss
        need_x, need_t = ctx.needs_input_grad[0], ctx.soft and ctx.needs_input_grad[1]
        if cfg.shard.size == 0:  # an empty slice: empty gradients, no kernel to run
            grad_x = torch.zeros_like(logits) if need_x else None
            return grad_x, (torch.zeros_like(target) if need_t else None), None, None, None
        grad_x = grad_t = None
        if need_x:
            grad_fn = soft_grad if ctx.soft else index_grad
            grad_x = grad_fn(logits, target, weight, lse, aux, g, g_lse, cfg)
        if need_t:
            grad_t = soft_target_grad(logits, target, weight, lse, g, cfg)
        return grad_x, grad_t, None, None, None


# ---- the entry point -----------------------------------------------------------------------------


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
    cfg = Config(
        shard,
        int(ignore_index),
        float(p["label_smoothing"]),
        0.0 if softcap is None else float(softcap),
        p["code"],
        group,
    )
    logits, w = p["logits"], p["weight"]
    w = None if w is None else w.to(_ops.acc_dtype(logits.dtype)).contiguous()
    loss, lse, aux = _CrossEntropy.apply(logits, p["rows_target"], w, p["soft"], cfg)
    denom = None if p["soft"] else aux.sum()
    index_target = None if p["soft"] else p["rows_target"]
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
    local = _LocalShard.apply(input)
    if isinstance(target, DTensor):
        # class probabilities sharded like the logits, or replicated class indices
        target = (
            _LocalShard.apply(target)
            if target.placements == input.placements
            else target.full_tensor()
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


class _LocalShard(torch.autograd.Function):
    """``DTensor.to_local()`` whose gradient is a DTensor with the input's own global shape and
    stride. torch 2.11's ``to_local`` backward recomputes the stride from the local shard, which
    for uneven shards (15 classes on 2 ranks: local (6, 8), global stride (15, 1)) disagrees with
    the input's; the gradient then breaks autograd's layout contract, and the accumulated
    ``.grad`` comes out replicated (the whole (6, 15) on every rank) instead of sharded."""

    @staticmethod
    def forward(ctx, dt) -> Tensor:  # type: ignore[override]
        ctx.spec = (dt.device_mesh, tuple(dt.placements), dt.shape, dt.stride())
        local = dt.to_local()
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = ctx.spec
        return DTensor.from_local(
            grad, mesh, placements, run_check=False, shape=shape, stride=stride
        )


def _slice_like(full: Tensor, local: Tensor, dim: int, mesh) -> Tensor:
    """This rank's slice along ``dim`` of a full tensor, with the sizes DTensor's Shard uses."""
    sizes = [0] * mesh.size()
    n = full.shape[dim]
    chunk = -(-n // mesh.size()) if n else 0
    for r in range(mesh.size()):
        sizes[r] = max(0, min(chunk, n - r * chunk))
    r = mesh.get_local_rank()
    return full.narrow(dim, sum(sizes[:r]), local.shape[dim])


# ---- the fused linear head, vocabulary-parallel --------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row loss and log-sum-exp (float64) of ``input @ linear_weight.T + linear_bias`` over the
    whole vocabulary, ``linear_weight`` holding this rank's rows of the projection.

    Rows go in chunks through one reused (chunk, size) logits buffer: forward computes the local
    partials of each chunk, then the two all-reduces of :func:`combine` for all rows at once;
    backward recomputes each chunk's logits, gets its gradient from the local kernels with the
    global log-sum-exp, and folds it into the input gradient (then summed over the ranks: the one
    collective of the backward, as the input is every rank's) and this rank's weight and bias
    gradients (accumulated in float32 for half types).
    """

    @staticmethod
    def forward(ctx, x, w, b, target, weight, soft: bool, cfg: Config, chunk: int):
        rows = x.shape[0]
        partials = torch.empty(rows, 3, dtype=torch.float64, device=x.device)
        local = soft_partials if soft else index_partials
        w_local = cfg.local_weight(weight)
        buf = x.new_empty(min(chunk, rows), cfg.shard.size)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            z = _linear_ce._logits_into(buf[: r1 - r0], x[r0:r1], w, b)
            local(z, target[r0:r1], w_local, cfg, partials[r0:r1])
        del buf
        loss, lse, aux = combine(partials, target, weight, soft, cfg, _ops.acc_dtype(x.dtype))
        ctx.save_for_backward(x, w, b, target, weight, lse, aux)
        ctx.soft, ctx.cfg, ctx.chunk = soft, cfg, chunk
        ctx.mark_non_differentiable(aux)
        return loss, lse, aux

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, g_lse, _g_aux):
        x, w, b, target, weight, lse, aux = ctx.saved_tensors
        cfg: Config = ctx.cfg
        need = ctx.needs_input_grad
        g = torch.zeros_like(lse) if g_loss is None else g_loss
        grads = _linear_ce._Grads(x, w, b, (need[0], need[1], need[2]))
        grad_t = torch.empty_like(target) if ctx.soft and need[3] else None
        grad_fn = soft_grad if ctx.soft else index_grad
        chunk = ctx.chunk
        # an empty slice of the projection adds nothing: zeros, no chunk (still all-reduced below)
        rows = x.shape[0] if cfg.shard.size > 0 else 0
        if rows == 0 and grads.input is not None:
            grads.input.zero_()
        buf = x.new_empty(min(chunk, rows), cfg.shard.size)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            z = _linear_ce._logits_into(buf[: r1 - r0], x[r0:r1], w, b)
            gl = None if g_lse is None else g_lse[r0:r1]
            tc = target[r0:r1]
            if grad_t is not None:
                grad_t[r0:r1] = soft_target_grad(z, tc, weight, lse[r0:r1], g[r0:r1], cfg)
            if any(need[:3]):
                # the gradient over the chunk's logits: one (chunk, size) buffer for both
                dz = grad_fn(z, tc, weight, lse[r0:r1], aux[r0:r1], g[r0:r1], gl, cfg, out=z)
                grads.add_chunk(r0, r1, dz, x[r0:r1], w)
        grad_x = grads.input
        if grad_x is not None:
            dist.all_reduce(grad_x, group=cfg.group)
        grad_w = None if grads.weight is None else grads.weight.to(w.dtype)
        grad_b = None if grads.bias is None else grads.bias.to(b.dtype)
        return grad_x, grad_w, grad_b, grad_t, None, None, None, None


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    return_z_loss: bool,
    return_lse: bool,
    chunk_size: Optional[int],
    backend: str,
    process_group,
):
    """softmax_ext.linear_cross_entropy with ``process_group``: ``linear_weight`` (and
    ``linear_bias``) hold this rank's contiguous rows of the (V, H) projection, ranks in order;
    ``input`` and class-index targets are the same on every rank, class probabilities are this
    rank's slice (..., size). Every rank returns the loss over the whole vocabulary, the full
    input gradient and its slice's weight and bias gradients."""
    from . import functional as F_

    if not dist.is_initialized():
        raise RuntimeError(
            "softmax_ext.linear_cross_entropy(process_group=...): torch.distributed is not "
            "initialized"
        )
    state = {}

    def check():
        F_._check_backend(backend)
        if backend == "torch":
            raise NotImplementedError(
                "softmax_ext.linear_cross_entropy: backend='torch' has no process_group path"
            )
        F_._check_lse_square_scale(lse_square_scale)
        if softcap is not None:
            F_._check_softcap(softcap)
        eps = 0.0 if label_smoothing != label_smoothing else float(label_smoothing)
        if not 0.0 <= eps <= 1.0:
            raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {eps}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
            raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
        soft = F_._check_linear_ce_args(input, linear_weight, linear_bias, target, None)
        if weight is not None:
            if weight.dim() != 1 or weight.dtype != input.dtype or weight.device != input.device:
                raise RuntimeError(
                    "weight must be the whole (V,) vector of class weights, in the input's dtype "
                    f"and on its device; got {list(weight.shape)}, {weight.dtype}, {weight.device}"
                )
            if weight.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(
                    "softmax_ext.linear_cross_entropy is not differentiable with respect to the "
                    "class weights 'weight'; this input cannot have requires_grad True"
                )
        size, hidden = linear_weight.shape
        x = input.reshape(-1, hidden)
        # rows from x, not -1: an empty shard's soft target (rows, 0) has no elements
        t = target.reshape(x.shape[0], size) if soft else target.reshape(-1).long()
        if soft and size > 1 and t.stride(1) != 1:
            t = t.contiguous()
        state.update(
            x=x,
            t=t,
            soft=soft,
            eps=eps,
            reduction=F_._REDUCTIONS[F_._Reduction.get_enum(reduction)],
            code=F_.backend_code(backend, input.device),
        )
        counted = None if soft else t[t != ignore_index]
        # the hidden size travels in the dtype slot's high bits: ranks must agree on it too
        wlen = -1 if weight is None else weight.numel()
        return x.shape[0], size, soft, counted, wlen, _DTYPE_CODES.get(x.dtype, 0) + 8 * hidden

    table, err = exchange_metadata(process_group, input.device, check)
    raise_on_every_rank(process_group, table, err)
    p = state
    shard = shard_of(process_group, table, not p["soft"])
    cfg = Config(
        shard,
        int(ignore_index),
        p["eps"],
        0.0 if softcap is None else float(softcap),
        p["code"],
        process_group,
    )
    x, t = p["x"], p["t"]
    chunk = _linear_ce.chunk_rows(x.shape[0], shard.size, x.element_size(), chunk_size)
    w = None if weight is None else weight.to(_ops.acc_dtype(x.dtype)).contiguous()
    loss, lse, aux = _LinearCrossEntropy.apply(
        x, linear_weight, linear_bias, t, w, p["soft"], cfg, max(1, chunk)
    )
    return F_._parallel_finish(
        loss,
        lse,
        None if p["soft"] else aux.sum(),
        None if p["soft"] else t,
        input.shape[:-1],
        input.dtype,
        ignore_index,
        p["reduction"],
        lse_square_scale,
        return_z_loss,
        return_lse,
    )

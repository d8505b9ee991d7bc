"""softmax / log_softmax forward and backward: Triton kernels beside their launchers.

The input is viewed as (outer, C, inner). A "lane" is one (outer, inner) pair, i.e. one softmax
vector whose C elements sit ``inner`` apart. Each program takes a (BLOCK_R lanes, BLOCK_C classes)
tile. Last-dim softmax (inner == 1): lanes are rows, contiguous along the classes, and a program
takes several rows when C is small. Otherwise (STRIDED) a program takes BLOCK_R consecutive inner
positions of one outer index, so the tile is contiguous along the lanes and loads coalesce there:
the tile keeps at least a 32-byte run of lanes and walks long class vectors in blocks
(:func:`strided_tile_shape`) rather than narrowing to one lane of scattered single loads.
"""

import math
from typing import Any, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    TILE,
    aligned,
    check_dtype,
    finite_shift,
    max_block_c,
    num_warps,
    on_device,
    online_lse_update,
    tile_shape,
    upcast,
    vector_width,
)

#: Most inner positions one program takes in the strided layout (wide tiles coalesce better).
MAX_BLOCK_LANES = 256
#: Consecutive bytes along the lanes a strided tile reads of each class at least: a 32-byte
#: sector, the unit memory moves in.
LANE_BYTES = 32


def strided_tile_shape(inner: int, n_classes: int, element_size: int) -> Tuple[int, int, bool]:
    """(BLOCK_R lanes, BLOCK_C classes, SINGLE) for softmax along a dim that is not last.

    Lanes are consecutive inner positions, contiguous in memory. A whole class vector stays on
    chip (one read) when it fits in a tile of :data:`TILE` elements beside a run of lanes of at
    least :data:`LANE_BYTES`; longer vectors keep that run and are walked in class blocks (the
    online path, which reads twice). Narrowing the tile to fewer lanes instead would waste most
    of each sector: one lane of float32 loads 32 bytes for 4 useful ones, so one read would cost
    eight times the bytes.
    """
    lanes = min(triton.next_power_of_2(inner), MAX_BLOCK_LANES)
    min_lanes = min(lanes, max(1, LANE_BYTES // element_size))
    block_c = min(triton.next_power_of_2(max(n_classes, 1)), max_block_c())
    if block_c * min_lanes <= TILE:
        lanes = min(lanes, max(1, TILE // block_c))
    else:
        lanes = min_lanes
        block_c = max(1, TILE // lanes)
    return lanes, block_c, n_classes <= block_c


@triton.jit
def _lane_offsets(
    pid,
    n_lanes,
    C,
    inner,
    lane_stride,
    lane_blocks,
    STRIDED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    VEC: tl.constexpr,
):
    """Start offsets of this program's lanes, which of them exist, and C and inner rewritten with
    the divisor VEC of the contiguous dim's extent (the lanes' inner, or the rows' C)."""
    lane_stride = aligned(lane_stride, VEC)
    if STRIDED:
        # lane_blocks programs cover the inner positions of one outer index.
        inner = aligned(inner, VEC)
        pos = (pid % lane_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        return (pid // lane_blocks).to(tl.int64) * lane_stride + pos, pos < inner, C, inner
    else:
        C = aligned(C, VEC)
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        return rows * lane_stride, rows < n_lanes, C, inner


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    n_lanes,
    C,
    inner,
    lane_stride,
    lane_blocks,
    LOG: tl.constexpr,
    IS_F64: tl.constexpr,
    SINGLE: tl.constexpr,
    STRIDED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    base, lane_ok, C, inner = _lane_offsets(
        tl.program_id(0), n_lanes, C, inner, lane_stride, lane_blocks, STRIDED, BLOCK_R, VEC
    )
    cols = tl.arange(0, BLOCK_C)
    m = upcast(tl.full([BLOCK_R], float("-inf"), tl.float32), IS_F64)
    s = upcast(tl.zeros([BLOCK_R], tl.float32), IS_F64)
    if SINGLE:
        mask = lane_ok[:, None] & (cols[None, :] < C)
        offs = base[:, None] + cols[None, :].to(tl.int64) * inner
        x = upcast(tl.load(x_ptr + offs, mask=mask, other=float("-inf")), IS_F64)
        m, s = online_lse_update(m, s, x, mask)
        z = x - finite_shift(m)[:, None]
        if LOG:
            y = z - tl.log(s)[:, None]
        else:
            y = tl.exp(z) / s[:, None]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = lane_ok[:, None] & (c[None, :] < C)
            offs = base[:, None] + c[None, :].to(tl.int64) * inner
            x = upcast(tl.load(x_ptr + offs, mask=mask, other=float("-inf")), IS_F64)
            m, s = online_lse_update(m, s, x, mask)
        shift = finite_shift(m)
        log_s = tl.log(s)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = lane_ok[:, None] & (c[None, :] < C)
            offs = base[:, None] + c[None, :].to(tl.int64) * inner
            x = upcast(tl.load(x_ptr + offs, mask=mask, other=float("-inf")), IS_F64)
            z = x - shift[:, None]
            if LOG:
                y = z - log_s[:, None]
            else:
                y = tl.exp(z) / s[:, None]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_terms(g, y, LOG: tl.constexpr):
    # The per-lane reduction the gradient needs: sum(g) for log_softmax, sum(g * y) for softmax.
    if LOG:
        return tl.sum(g, axis=1)
    else:
        return tl.sum(g * y, axis=1)


@triton.jit
def _softmax_bwd_grad(g, y, r, LOG: tl.constexpr):
    if LOG:
        return g - tl.exp(y) * r[:, None]
    else:
        return y * (g - r[:, None])


@triton.jit
def _softmax_bwd_kernel(
    g_ptr,
    y_ptr,
    gi_ptr,
    n_lanes,
    C,
    inner,
    lane_stride,
    lane_blocks,
    LOG: tl.constexpr,
    IS_F64: tl.constexpr,
    SINGLE: tl.constexpr,
    STRIDED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    base, lane_ok, C, inner = _lane_offsets(
        tl.program_id(0), n_lanes, C, inner, lane_stride, lane_blocks, STRIDED, BLOCK_R, VEC
    )
    cols = tl.arange(0, BLOCK_C)
    if SINGLE:
        mask = lane_ok[:, None] & (cols[None, :] < C)
        offs = base[:, None] + cols[None, :].to(tl.int64) * inner
        g = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), IS_F64)
        y = upcast(tl.load(y_ptr + offs, mask=mask, other=0.0), IS_F64)
        r = _softmax_bwd_terms(g, y, LOG)
        gi = _softmax_bwd_grad(g, y, r, LOG)
        tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=mask)
    else:
        r = upcast(tl.zeros([BLOCK_R], tl.float32), IS_F64)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = lane_ok[:, None] & (c[None, :] < C)
            offs = base[:, None] + c[None, :].to(tl.int64) * inner
            g = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), IS_F64)
            y = upcast(tl.load(y_ptr + offs, mask=mask, other=0.0), IS_F64)
            r += _softmax_bwd_terms(g, y, LOG)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = lane_ok[:, None] & (c[None, :] < C)
            offs = base[:, None] + c[None, :].to(tl.int64) * inner
            g = upcast(tl.load(g_ptr + offs, mask=mask, other=0.0), IS_F64)
            y = upcast(tl.load(y_ptr + offs, mask=mask, other=0.0), IS_F64)
            gi = _softmax_bwd_grad(g, y, r, LOG)
            tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=mask)


def _geometry(t: Tensor, dim: int) -> Tuple[int, int, int]:
    """(outer, C, inner) of a contiguous tensor around ``dim``."""
    if t.dim() == 0:
        return 1, 1, 1
    return math.prod(t.shape[:dim]), t.shape[dim], math.prod(t.shape[dim + 1 :])


def _launch(kernel: Any, tensors: Tuple[Tensor, ...], out: Tensor, dim: int, log: bool) -> Tensor:
    outer, n_classes, inner = _geometry(out, dim)
    if out.numel() == 0:
        return out
    strided = inner > 1
    if strided:
        block_r, block_c, single = strided_tile_shape(inner, n_classes, out.element_size())
        vec = vector_width(out.element_size(), inner)
    else:
        block_r, block_c, single = tile_shape(outer, n_classes)
        vec = vector_width(out.element_size(), n_classes)
    lane_blocks = triton.cdiv(inner, block_r)
    grid = (outer * lane_blocks if strided else triton.cdiv(outer, block_r),)
    with on_device(out):
        kernel[grid](
            *tensors,
            out,
            outer * inner,
            n_classes,
            inner,
            n_classes * inner if strided else n_classes,
            lane_blocks,
            LOG=log,
            IS_F64=out.dtype == torch.float64,
            SINGLE=single,
            STRIDED=strided,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            VEC=vec,
            num_warps=num_warps(block_r, block_c),
        )
    return out


def softmax_fwd(input: Tensor, dim: int, log: bool) -> Tensor:
    """softmax (``log`` False) or log_softmax (``log`` True) of ``input`` along ``dim``.

    ``input`` may have any rank; ``dim`` is non-negative. Returns a contiguous tensor in the
    input's dtype; half types are computed in float32.
    """
    check_dtype(input, "input")
    x = input.contiguous()
    return _launch(_softmax_fwd_kernel, (x,), torch.empty_like(x), dim, log)


def softmax_bwd(grad_output: Tensor, output: Tensor, dim: int, log: bool) -> Tensor:
    """Gradient of softmax/log_softmax from the forward's ``output`` and ``grad_output``.

    softmax: ``y * (g - sum(g * y))``; log_softmax: ``g - exp(y) * sum(g)`` (sums along ``dim``).
    """
    check_dtype(output, "output")
    y = output.contiguous()
    g = grad_output.to(y.dtype).contiguous()
    return _launch(_softmax_bwd_kernel, (g, y), torch.empty_like(y), dim, log)

"""Helpers shared by the Triton kernels: block-size policy, dtype helpers and launch plumbing.

Every kernel works on a 2-D tile: axis 0 are independent rows (``BLOCK_R`` of them per program),
axis 1 the classes (``BLOCK_C`` at a time). A row that fits in one class block is read once
(single-block path); wider rows are walked block by block with an online log-sum-exp.
"""

import contextlib
import os
import warnings
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
import triton
import triton.language as tl

from ..ops import LossOptions

#: Environment variable that caps the class block (a power of two >= 1). Tests set it to a tiny
#: value so the multi-block (online) path runs on small shapes in the interpreter.
BLOCK_ENV = "SOFTMAX_EXT_TRITON_BLOCK"
#: Widest class block kept on chip; beyond it rows are processed by the online loop.
MAX_BLOCK_C = 8192
#: Elements per program tile when several short rows share one program.
TILE = 4096
#: Most rows one program handles.
MAX_BLOCK_R = 128


def max_block_c() -> int:
    """The class-block cap: ``$SOFTMAX_EXT_TRITON_BLOCK`` when set, else :data:`MAX_BLOCK_C`."""
    raw = os.environ.get(BLOCK_ENV)
    if not raw:
        return MAX_BLOCK_C
    value = int(raw)
    if value < 1 or value & (value - 1):
        raise ValueError(f"{BLOCK_ENV} must be a power of two >= 1, got {raw!r}")
    return value


#: The widest class block of the soft-capping kernels: each element carries a tanh's temporaries
#: (triton 3.6 spilled in the soft-target forward with 8192-wide blocks, 16 per thread).
SOFTCAP_MAX_BLOCK_C = 4096


def tile_shape(n_rows: int, n_classes: int, softcap: float = 0.0) -> Tuple[int, int, bool]:
    """(BLOCK_R, BLOCK_C, SINGLE) for ``n_rows`` rows of ``n_classes`` classes.

    SINGLE is true when a whole row fits in one class block, so the row is loaded only once.
    BLOCK_R is at most :data:`MAX_BLOCK_R`; with ``softcap`` BLOCK_C is at most
    :data:`SOFTCAP_MAX_BLOCK_C`. (Softmax along a dim that is not last has its own,
    ``softmax.strided_tile_shape``.)
    """
    cap = max_block_c()
    if softcap:
        cap = min(cap, SOFTCAP_MAX_BLOCK_C)
    block_c = min(triton.next_power_of_2(max(n_classes, 1)), cap)
    block_r = min(triton.next_power_of_2(max(n_rows, 1)), TILE // block_c, MAX_BLOCK_R)
    return max(1, block_r), block_c, n_classes <= block_c


def num_warps(block_r: int, block_c: int, softcap: float = 0.0) -> int:
    """Warps for a tile (4 to 16): enough threads that each holds at most 16 elements of a one-row
    tile, or 8 of a tile of several rows, whose per-row values (target, scale, log-sum-exp, row
    offsets) each thread also keeps for every row it touches. Short rows with 4 warps took 200 to
    250 registers in the backward kernels; `make compile-gpu` shows the counts. With ``softcap``
    (a tanh per element) half as many elements per thread."""
    per_thread = 16 if block_r == 1 else 8
    if softcap:
        per_thread //= 2
    return max(4, min(16, block_r * block_c // (32 * per_thread)))


#: Widest global access of one thread, in bytes (128-bit loads and stores).
VECTOR_BYTES = 16


def vector_width(element_size: int, *extents: int) -> int:
    """The VEC constexpr: the largest power of two v, v * ``element_size`` <= 16 bytes, that
    divides every one of ``extents`` (the class count and row strides a kernel offsets by).

    Triton marks only integers divisible by 16 as such; a kernel that rewrites these integers
    with :func:`aligned` lets the compiler use v-element vector loads (rows of 1000 float32
    logits: 128-bit instead of 32-bit loads). Whether the base pointers are aligned enough is
    Triton's own specialisation (16 bytes or nothing), so a misaligned view stays correct.
    """
    v = max(1, VECTOR_BYTES // element_size)
    for n in extents:
        while n % v:
            v //= 2
    return v


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_dtype(t: torch.Tensor, what: str) -> None:
    """Raise TypeError unless ``t`` is one of the four supported floating dtypes."""
    if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"softmax_ext (triton): unsupported {what} dtype {t.dtype}")


def check_weight(weight: Optional[torch.Tensor], logits: torch.Tensor) -> None:
    """Raise ValueError unless ``weight`` is None or a contiguous (C,) vector in the logits'
    accumulation dtype (the kernels index it as one)."""
    if weight is not None and (
        weight.dtype != acc_dtype(logits.dtype)
        or weight.dim() != 1
        or weight.shape[0] != logits.shape[1]
        or (weight.shape[0] > 1 and weight.stride(0) != 1)
    ):
        raise ValueError(
            f"softmax_ext (triton): weight must be a contiguous ({logits.shape[1]},) "
            f"{acc_dtype(logits.dtype)} vector, got {tuple(weight.shape)} {weight.dtype} with "
            f"stride {tuple(weight.stride())}"
        )


def unit_class_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` (rows, C) with stride(1) == 1, copying only when needed; rows keep their stride."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last) bytes of memory that ``t``'s elements occupy (empty for no elements)."""
    if t.numel() == 0:
        return 0, 0
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def check_grad_out(grad: torch.Tensor, logits: torch.Tensor, *others: Optional[torch.Tensor]):
    """Check the ``grad_logits`` argument of a backward kernel's ``_into`` variant.

    Raises ValueError unless it is a contiguous tensor of the logits' shape, dtype and device, and
    RuntimeError (torch's error for the same aliasing) when it overlaps the logits other than
    being them (the kernels read each logit before overwriting it) or overlaps any of ``others``.
    """
    if (
        grad.shape != logits.shape
        or grad.dtype != logits.dtype
        or grad.device != logits.device
        or not grad.is_contiguous()
    ):
        raise ValueError(
            f"softmax_ext (triton): grad_logits must be a contiguous {tuple(logits.shape)} "
            f"{logits.dtype} tensor on {logits.device}, got {tuple(grad.shape)} {grad.dtype} on "
            f"{grad.device} with stride {tuple(grad.stride())}"
        )
    g0, g1 = _byte_span(grad)
    same = (grad.data_ptr(), grad.stride()) == (logits.data_ptr(), logits.stride())
    for i, t in enumerate((logits, *others)):
        if t is None or (i == 0 and same):
            continue
        t0, t1 = _byte_span(t)
        if g0 < t1 and t0 < g1:
            raise RuntimeError(
                "unsupported operation: some elements of the input tensor and the written-to "
                "tensor refer to a single memory location. Please clone() the tensor before "
                "performing the operation."
            )


@contextlib.contextmanager
def on_device(t: torch.Tensor) -> Iterator[None]:
    """Launch context for kernels on ``t``'s device.

    CUDA: make ``t``'s device current (Triton launches on the current device). CPU (the
    interpreter, which runs kernels in NumPy): silence NumPy's floating-point warnings, which the
    kernels trigger on purpose in discarded ``tl.where`` branches, padded lanes and NaN rows.
    """
    if t.is_cuda:
        if t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                yield
        else:
            yield
    else:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
            yield


def loss_options(options: Tuple[Union[int, float], ...]) -> LossOptions:
    """The option block of a cross-entropy launcher's call (its arguments after the tensors, in
    schema order), by name. Raises TypeError when the count does not match the schema."""
    if len(options) != len(LossOptions._fields):
        raise TypeError(
            f"softmax_ext (triton): expected the {len(LossOptions._fields)} loss options "
            f"{LossOptions._fields}, got {len(options)}: {options!r}"
        )
    return LossOptions(*options)


def softcap_factors(softcap: float) -> Tuple[float, float]:
    """(cap, 1 / cap) as runtime float64 scalars for the kernels' HAS_SOFTCAP path, (0, 0) when
    there is no cap (``softcap`` 0). The kernels scale by 1 / cap: a multiply instead of a
    division per logit, as the C++ kernels do."""
    cap = float(softcap)
    return (cap, 1.0 / cap) if cap else (0.0, 0.0)


def smoothing_factors(label_smoothing: float, n_classes: int) -> Tuple[float, float]:
    """(1 - eps, eps / C): the factors of the target's term and of the mean over classes under
    label smoothing eps, in float64. The kernels take them as runtime float64 scalars and round
    each once to the accumulation dtype, as PyTorch applies double scalars to float tensors.

    Computed here rather than in the kernels: a float64 division there took up to 8 more
    registers (32 -> 40 in the 4 x 1024 half-precision index backward, triton 3.8), for one value
    per launch. C = 0 gives
    IEEE's inf or NaN, as on the device.
    """
    eps = np.float64(label_smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(1.0 - eps), float(eps / n_classes)


def check_targets(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Host-side check of class indices, for CPU tensors only (the interpreter).

    Raises IndexError with PyTorch's message for the first target neither in [0, C) nor equal
    to ``ignore_index``. Other devices are never checked here: on CUDA that would synchronise the
    host (and meta tensors, which tools/compile_gpu.py launches with, hold no values).
    """
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


@triton.jit
def upcast(x, IS_F64: tl.constexpr):
    """``x`` in the accumulation dtype: float64 for float64 data, float32 otherwise."""
    if IS_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def upcast_scalar(x, IS_F64: tl.constexpr):
    """A float64 scalar argument (such as a smoothing factor) in the accumulation dtype, as a
    [1] tensor: the interpreter passes scalars as Python floats, which :func:`upcast` cannot
    convert."""
    return upcast(tl.zeros([1], tl.float64) + x, IS_F64)


@triton.jit
def aligned(n, VEC: tl.constexpr):
    """``n`` itself, which VEC divides (see :func:`vector_width`), written so that the compiler
    knows VEC divides it: offsets and masks built from it then allow VEC-wide vector accesses."""
    return (n // VEC) * VEC


@triton.jit
def online_lse_update(m, s, x, mask):
    """Fold a (BLOCK_R, BLOCK_C) block ``x`` into the running row max ``m`` and sum ``s``.

    ``s`` is the sum of exp(x - m) over the columns seen so far. Padded lanes (``mask`` false)
    contribute nothing. A row that is -inf so far keeps s = 0 (the shift uses 0 instead of
    -inf, avoiding -inf - -inf), while +inf and NaN poison ``s`` with NaN as in PyTorch.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    # The old sum is 0 while m == -inf, so its scale is irrelevant; 0 avoids exp(-inf + inf).
    alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
    p = tl.where(mask, tl.exp(x - shift[:, None]), 0.0)
    return m_new, s * alpha + tl.sum(p, axis=1)


@triton.jit
def rows_online_lse(
    x_rows,
    row_ok,
    C,
    m,
    s,
    cap,
    inv_cap,
    HAS_SOFTCAP: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Fold every class block of rows (unit class stride, soft-capped under HAS_SOFTCAP) into the
    running (m, s)."""
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c[None, :] < C)
        x = load_logits(
            x_rows[:, None] + c[None, :], mask, float("-inf"), cap, inv_cap, HAS_SOFTCAP, IS_F64
        )
        m, s = online_lse_update(m, s, x, mask)
    return m, s


@triton.jit
def finite_shift(m):
    """The row max used as shift: 0 for an all -inf (or empty) row, so x - shift stays -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def lse_to_f64(m, log_s):
    """The row log-sum-exp in float64: the max is exact, so only log(sum) carries rounding."""
    return m.to(tl.float64) + log_s.to(tl.float64)


@triton.jit
def split_lse(lse, IS_F64: tl.constexpr):
    """A float64 log-sum-exp as hi + lo in the accumulation dtype, for exp((x - hi) - lo).

    With float32 accumulation this keeps p = exp(x - lse) accurate for logits near 1e4, where a
    float32 lse alone would lose four digits.
    """
    hi = upcast(lse, IS_F64)
    return hi, upcast(lse - hi.to(tl.float64), IS_F64)


@triton.jit
def tanh(u, IS_F64: tl.constexpr):
    """tanh(u) in the dtype of ``u``, within a few ulp, NaN kept, +-inf to +-1.

    Triton's core has no tanh, and libdevice's does not run under the interpreter. Above
    |u| = 0.55: 1 - 2 / (exp(2|u|) + 1), with |u| held at 20 (where tanh rounds to 1 in float64
    too). Below, the odd Taylor series to u^15, whose next term is under 5e-8 of u there: enough
    for float32; float64 evaluates it at u / 4 (next term under 4e-18) and doubles the argument
    twice with tanh(2v) = 2 tanh(v) / (1 + tanh(v)^2).
    """
    a = tl.abs(u)
    e = tl.exp(2.0 * tl.minimum(a, 20.0))
    big = 1.0 - 2.0 / (e + 1.0)
    big = tl.where(u < 0.0, -big, big)
    if IS_F64:
        v = u * 0.25
    else:
        v = u
    s = v * v
    p = -929569.0 / 638512875.0
    p = p * s + 21844.0 / 6081075.0
    p = p * s - 1382.0 / 155925.0
    p = p * s + 62.0 / 2835.0
    p = p * s - 17.0 / 315.0
    p = p * s + 2.0 / 15.0
    p = p * s - 1.0 / 3.0
    small = v + v * s * p
    if IS_F64:
        small = 2.0 * small / (1.0 + small * small)
        small = 2.0 * small / (1.0 + small * small)
    r = tl.where(a < 0.55, small, big)
    return tl.where(u != u, u, r)


@triton.jit
def soft_capped(x, cap, inv_cap, HAS_SOFTCAP: tl.constexpr, IS_F64: tl.constexpr):
    """(z, dz/dx) for logits ``x`` in the accumulation dtype: z = cap * tanh(x / cap) and
    1 - tanh^2 under HAS_SOFTCAP (``cap``, ``inv_cap`` the launcher's float64 scalars from
    :func:`softcap_factors`), else (x, 1.0). A -inf logit becomes -cap: callers keep their
    padded lanes out of sums with their mask."""
    if HAS_SOFTCAP:
        t = tanh(x * upcast_scalar(inv_cap, IS_F64), IS_F64)
        return upcast_scalar(cap, IS_F64) * t, 1.0 - t * t
    else:
        return x, 1.0


@triton.jit
def load_logits(ptrs, mask, other, cap, inv_cap, HAS_SOFTCAP: tl.constexpr, IS_F64: tl.constexpr):
    """Logits at ``ptrs`` in the accumulation dtype, soft-capped under HAS_SOFTCAP; lanes outside
    ``mask`` hold ``other`` (capped -inf padding would be -cap, a lane the sums would count)."""
    x = upcast(tl.load(ptrs, mask=mask, other=other), IS_F64)
    if HAS_SOFTCAP:
        z, _ = soft_capped(x, cap, inv_cap, HAS_SOFTCAP, IS_F64)
        x = tl.where(mask, z, other)
    return x

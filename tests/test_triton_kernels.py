"""Triton-specific tests of the softmax_ext kernels.

They run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, as `make test-triton`
does) and on CUDA tensors when a GPU is present and the interpreter is off. A tiny class block
(``SOFTMAX_EXT_TRITON_BLOCK``) forces the online multi-block path on small shapes.
References are float64 PyTorch computations.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import softmax_ext  # noqa: E402
from softmax_ext import ops  # noqa: E402
from softmax_ext import triton as se_triton  # noqa: E402
from softmax_ext.triton._common import (  # noqa: E402
    BLOCK_ENV,
    max_block_c,
    num_warps,
    tanh,
    vector_width,
)
from softmax_ext.triton.softmax import strided_tile_shape  # noqa: E402

pytestmark = pytest.mark.triton

INTERPRETED = se_triton.interpreter_active()
HAS_CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if HAS_CUDA else [])
if not DEVICES:
    pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA GPU", allow_module_level=True)

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (and no interpreter)")
INF, NAN = math.inf, math.nan


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=[None, "4", "1"], ids=["block-default", "block-4", "block-1"])
def block(request, monkeypatch) -> None:
    """Class-block cap: default (single-block path) or tiny (online multi-block path)."""
    if request.param is None:
        monkeypatch.delenv(BLOCK_ENV, raising=False)
    else:
        monkeypatch.setenv(BLOCK_ENV, request.param)
    return request.param


def kernels(device: str):
    """The kernel operators as backend='triton' serves them: those of ops.BACKEND_TRITON on
    CPU (the interpreter), the default ones on CUDA."""
    return ops.kernels("triton", torch.device(device))


def opts(
    eps: float = 0.0, ignore_index: int = -100, reduction: int = 1, softcap: float = 0.0
) -> ops.LossOptions:
    """The cross-entropy kernels' option block (splat it after the tensors)."""
    return ops.LossOptions(
        ignore_index=ignore_index, label_smoothing=eps, reduction=reduction, softcap=softcap
    )


def assert_close(actual, expected, atol=1e-12, rtol=1e-10):
    torch.testing.assert_close(
        actual, expected.to(actual.dtype), atol=atol, rtol=rtol, equal_nan=True
    )


# ---------------------------------------------------------------- references (float64 torch)
def ref_index(x, t, w, ignore_index, gn, gs=None):
    """(nll, smooth, lse, grad) from log_softmax and autograd: grad = d/dx of
    sum(gn * nll + gs * smooth), the smoothing term left out when ``gs`` is None."""
    x = x.detach().double().requires_grad_()
    n, c = x.shape
    w = torch.ones(c, dtype=torch.float64, device=x.device) if w is None else w.double()
    logp = torch.log_softmax(x, 1)
    ok = t != ignore_index
    safe = torch.where(ok, t, 0)
    nll = torch.where(ok, -logp.gather(1, safe[:, None])[:, 0] * w[safe], 0.0)
    smooth = torch.where(ok, -(logp * w).sum(1), 0.0)
    objective = (gn.double() * nll).sum()
    if gs is not None:
        objective = objective + (gs.double() * smooth).sum()
    objective.backward()
    return nll.detach(), smooth.detach(), torch.logsumexp(x.detach(), 1), x.grad


def ref_index_loss(x, t, w, ignore_index, g, eps):
    """(loss, lse, grad) of the ce_index kernels with label smoothing ``eps``, from the float64
    :func:`ref_index` terms: loss = (1 - eps) * nll + (eps / C) * smooth, grad for
    grad_nll = (1 - eps) g and grad_smooth = (eps / C) g. eps == 0 is nll alone (so a NaN smooth
    term, e.g. weight 0 on a -inf logit, stays out), as in torch."""
    c = x.shape[1]
    g = g.double()
    if eps == 0:
        nll, _, lse, grad = ref_index(x, t, w, ignore_index, g)
        return nll, lse, grad
    nll, smooth, lse, grad = ref_index(x, t, w, ignore_index, (1 - eps) * g, (eps / c) * g)
    return (1 - eps) * nll + (eps / c) * smooth, lse, grad


def ref_soft(x, q, w, eps, g):
    x = x.detach().double().requires_grad_()
    n, c = x.shape
    w = torch.ones(c, dtype=torch.float64, device=x.device) if w is None else w.double()
    qq = (1 - eps) * q.double() + eps / c
    loss = -(w * qq * torch.log_softmax(x, 1)).sum(1)
    (g.double() * loss).sum().backward()
    return loss.detach(), torch.logsumexp(x.detach(), 1), (w * qq).sum(1), x.grad


# ---------------------------------------------------------------- softmax
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "shape,dim",
    [
        ((3, 9), 1),
        ((2, 5, 3), 1),
        ((5, 2), 0),
        ((4,), 0),
        ((2, 3, 1), 2),
        ((3, 0), 1),
        ((2, 3, 300), 1),
    ],
)
def test_softmax_matches_torch(device, block, shape, dim, log):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    ref = (torch.log_softmax if log else torch.softmax)(x, dim)
    xr = x.clone().requires_grad_()
    (torch.log_softmax if log else torch.softmax)(xr, dim).backward(g)
    k = kernels(device)
    assert_close(k.softmax_fwd(x, dim, log), ref)
    assert_close(k.softmax_bwd(g, ref, dim, log), xr.grad)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_strided_class_blocks(device, monkeypatch, log):
    """A class dim that is not last and longer than one tile: a 4-lane x 1024-class tile (float64)
    walks the classes in blocks, the last one partly masked."""
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    assert strided_tile_shape(5, 1100, 8) == (4, 1024, False)
    x = torch.randn(3, 1100, 5, dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    fn = torch.log_softmax if log else torch.softmax
    ref = fn(x, 1)
    xr = x.clone().requires_grad_()
    fn(xr, 1).backward(g)
    k = kernels(device)
    assert_close(k.softmax_fwd(x, 1, log), ref)
    assert_close(k.softmax_bwd(g, ref, 1, log), xr.grad)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_hostile_rows(device, block, log):
    x = torch.randn(6, 5, dtype=torch.float64, device=device)
    x[0, 1] = INF
    x[1, 4] = NAN
    x[2] = -INF
    x[3, :4] = -INF  # the only finite value sits alone in the last, mostly padded block
    x[4] = -1e300
    x[5, 2] = -INF
    fn = torch.log_softmax if log else torch.softmax
    assert_close(kernels(device).softmax_fwd(x, 1, log), fn(x, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_half_types(device, block, dtype):
    x = (torch.randn(4, 37, device=device) * 4).to(dtype)
    k = kernels(device)
    for log in (False, True):
        y = k.softmax_fwd(x, 1, log)
        assert y.dtype == dtype
        ref = (torch.log_softmax if log else torch.softmax)(x.double(), 1)
        assert_close(y, ref, atol=2e-3 if dtype == torch.float32 else 2e-2, rtol=1e-2)


# ---------------------------------------------------------------- cross-entropy, index targets
def _index_case(device, n, c, weighted, ignore_index, gen_seed=0):
    """Logits as a column slice (row stride c + 3) and targets as an odd-offset strided slice."""
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(n, c + 3, dtype=torch.float64, generator=g).to(device)[:, 1 : c + 1]
    t = torch.randint(0, c, (2 * n + 1,), generator=g).to(device)[1::2]
    t[::3] = ignore_index
    w = torch.rand(c, dtype=torch.float64, generator=g).to(device) if weighted else None
    return x, t, w


#: Label smoothing of the index tests: 0 is the nll term alone (WITH_SMOOTH off), 1 the smoothing
#: term alone (scaled by 1 / C), 0.3 both.
INDEX_EPS = [0.0, 0.3, 1.0]


@pytest.mark.parametrize("c", [1, 5, 8, 13])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("eps", INDEX_EPS)
def test_ce_index_matches_torch(device, block, c, weighted, ignore_index, eps):
    n = 7
    x, t, w = _index_case(device, n, c, weighted, ignore_index)
    assert x.stride(0) == c + 3 and t.stride(0) == 2 and t.storage_offset() == 1
    g = torch.randn(n, dtype=torch.float64, device=device)
    g0 = torch.randn((), dtype=torch.float64, device=device).expand(n)  # stride 0
    k = kernels(device)
    o = opts(eps, ignore_index)
    loss, lse = k.ce_index_fwd(x, t, w, *o)
    r_loss, r_lse, r_grad = ref_index_loss(x, t, w, ignore_index, g, eps)
    assert loss.dtype == lse.dtype == torch.float64  # lse: float64 always
    assert_close(loss, r_loss)
    assert_close(lse, r_lse)
    torch_loss = F.cross_entropy(
        x, t, w, ignore_index=ignore_index, label_smoothing=eps, reduction="none"
    )
    assert_close(loss, torch_loss)
    assert (loss[t == ignore_index] == 0).all()
    grad = k.ce_index_bwd(g, x, t, w, lse, None, *o)
    assert grad.is_contiguous() and grad.shape == x.shape
    assert_close(grad, r_grad)
    assert (grad[t == ignore_index] == 0).all()
    assert_close(
        k.ce_index_bwd(g0, x, t, w, lse, None, *o),
        ref_index_loss(x, t, w, ignore_index, g0, eps)[2],
    )


def test_ce_index_lse_ignores_padding(device, block):
    # Very negative rows: any mass leaking from padded lanes (exp(0) = 1) would dominate.
    x = torch.full((3, 5), -1e4, dtype=torch.float64, device=device)
    x[1, 4] = -INF
    x[2, :4] = -INF
    t = torch.tensor([0, 1, 4], device=device)
    k = kernels(device)
    loss, lse = k.ce_index_fwd(x, t, None, *opts())
    assert_close(lse, torch.logsumexp(x, 1))
    assert torch.isfinite(loss).all()
    # With smoothing the -inf logits make the loss of rows 1 and 2 infinite, as in torch.
    loss, lse = k.ce_index_fwd(x, t, None, *opts(0.1))
    assert_close(lse, torch.logsumexp(x, 1))
    assert_close(loss, F.cross_entropy(x, t, label_smoothing=0.1, reduction="none"))
    assert torch.isfinite(loss[0])


@pytest.mark.parametrize("eps", INDEX_EPS)
def test_ce_index_hostile_values(device, block, eps):
    x = torch.randn(7, 6, dtype=torch.float64, device=device)
    x[0, 2] = INF
    x[1, 3] = NAN
    x[2] = -INF  # all -inf: NaN loss
    x[3, :5] = -INF  # -inf elsewhere: probability 0
    x[4, 0] = -INF  # weight 0 on a -inf logit: NaN smooth term, as in torch
    x[5] = -INF  # ignored all -inf row: exactly 0
    x[6, 5] = -INF
    t = torch.tensor([1, 1, 0, 5, 3, -100, 2], device=device)
    w = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    w[0] = 0
    g = torch.linspace(0.5, 2.0, 7, dtype=torch.float64, device=device)
    k = kernels(device)
    loss, lse = k.ce_index_fwd(x, t, w, *opts(eps))
    r_loss, _, r_grad = ref_index_loss(x, t, w, -100, g, eps)
    assert_close(loss, r_loss)
    grad = k.ce_index_bwd(g, x, t, w, lse, None, *opts(eps))
    assert_close(grad[:5], r_grad[:5])
    assert (grad[5] == 0).all()
    assert_close(grad[6], r_grad[6])
    assert torch.isnan(loss[:3]).all() and loss[5] == 0
    if eps == 0:
        assert torch.isfinite(loss[3:]).all()
    else:
        # A -inf logit makes the smoothing term infinite, NaN where its weight is 0 (rows 3, 4).
        assert torch.isnan(loss[3:5]).all() and loss[6] == INF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ce_index_half_types(device, block, dtype):
    n, c = 6, 11
    x = (torch.randn(n, c, device=device) * 3).to(dtype)
    x[0] = 0
    x[0, 4] = 10  # confident row: its true-class gradient p - 1 ~ -3e-4 needs fp32
    t = torch.tensor([4, 1, 2, 3, 10, 0], device=device)
    g = torch.ones((), device=device).expand(n)
    k = kernels(device)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for eps in INDEX_EPS:
        loss, lse = k.ce_index_fwd(x, t, None, *opts(eps))
        assert loss.dtype == torch.float32 and lse.dtype == torch.float64
        r_loss, r_lse, r_grad = ref_index_loss(x, t, None, -100, g, eps)
        assert_close(loss, r_loss, atol=1e-5, rtol=1e-5)
        assert_close(lse, r_lse, atol=1e-5, rtol=1e-5)
        grad = k.ce_index_bwd(g, x, t, None, lse, None, *opts(eps))
        assert grad.dtype == dtype
        assert_close(grad, r_grad, atol=tol * c, rtol=tol)
        if eps == 0:
            assert abs(float(grad[0, 4]) / float(r_grad[0, 4]) - 1) < 1e-2


def test_ce_large_logits_keep_gradient_accuracy(device, block):
    """The float64 lse (split hi + lo in the backward) keeps p exact for logits near 1e4."""
    x = (1e4 + torch.randn(4, 9, device=device)).float()
    t = torch.tensor([0, 3, 8, 5], device=device)
    g = torch.ones(4, device=device)
    k = kernels(device)
    _, lse = k.ce_index_fwd(x, t, None, *opts())
    assert lse.dtype == torch.float64
    grad = k.ce_index_bwd(g, x, t, None, lse, None, *opts())
    assert_close(grad, ref_index(x, t, None, -100, g)[3], atol=1e-6, rtol=1e-5)
    q = torch.softmax(torch.randn(4, 9, device=device), 1)
    _, lse, tsum = k.ce_soft_fwd(x, q, None, *opts())
    assert_close(
        k.ce_soft_bwd(g, x, q, None, lse, tsum, None, *opts()),
        ref_soft(x, q, None, 0.0, g)[3],
        atol=1e-6,
        rtol=1e-5,
    )


def test_ce_index_bad_targets_raise_on_cpu():
    if not INTERPRETED:
        pytest.skip("interpreter (CPU) path")
    k = kernels("cpu")
    x = torch.randn(4, 5)
    for bad in (5, -1, -101, 2**40):
        t = torch.tensor([0, -100, bad, 1])
        with pytest.raises(IndexError, match=rf"^Target {bad} is out of bounds\.$"):
            k.ce_index_fwd(x, t, None, *opts())
        with pytest.raises(IndexError):
            k.ce_index_bwd(
                torch.ones(4), x, t, None, torch.zeros(4, dtype=torch.float64), None, *opts()
            )
        with pytest.raises(IndexError, match=rf"^Target {bad} is out of bounds\.$"):
            softmax_ext.cross_entropy(x, t, backend="triton")
        with pytest.raises(IndexError, match=rf"^Target {bad} is out of bounds\.$"):
            F.cross_entropy(x, t)  # the message mirrors PyTorch's


# ---------------------------------------------------------------- cross-entropy, soft targets
@pytest.mark.parametrize("c", [1, 6, 9])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_ce_soft_matches_torch(device, block, c, weighted, eps):
    n = 5
    x = torch.randn(n, c + 2, dtype=torch.float64, device=device)[:, 2:]
    q = torch.rand(n, 2 * c, dtype=torch.float64, device=device)[:, ::2].contiguous()
    q[1] = 0
    w = torch.rand(c, dtype=torch.float64, device=device) if weighted else None
    g = torch.randn(n, dtype=torch.float64, device=device)
    k = kernels(device)
    # ignore_index and reduction do not concern soft targets: any value gives the same result.
    o = opts(eps, ignore_index=0, reduction=0)
    loss, lse, tsum = k.ce_soft_fwd(x, q, w, *o)
    r_loss, r_lse, r_tsum, r_grad = ref_soft(x, q, w, eps, g)
    assert_close(loss, r_loss)
    assert_close(lse, r_lse)
    assert_close(tsum, r_tsum)
    assert_close(k.ce_soft_bwd(g, x, q, w, lse, tsum, None, *o), r_grad)
    g0 = torch.ones((), dtype=torch.float64, device=device).expand(n)
    assert_close(k.ce_soft_bwd(g0, x, q, w, lse, tsum, None, *o), ref_soft(x, q, w, eps, g0)[3])


def test_ce_soft_hostile_values(device, block):
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    x[0, 2] = INF
    x[1, 3] = NAN
    x[2] = -INF
    x[3, 1] = -INF  # target 0 on a -inf logit: NaN (0 * inf), as in torch
    x[4, 5] = 30.0
    q = torch.softmax(torch.randn(5, 6, dtype=torch.float64, device=device), 1)
    q[3, 1] = 0
    q[4] = 0
    q[4, 5] = 1
    g = torch.ones(5, dtype=torch.float64, device=device)
    k = kernels(device)
    loss, lse, tsum = k.ce_soft_fwd(x, q, None, *opts())
    r_loss, _, _, r_grad = ref_soft(x, q, None, 0.0, g)
    assert_close(loss, r_loss)
    assert_close(k.ce_soft_bwd(g, x, q, None, lse, tsum, None, *opts()), r_grad)
    assert torch.isnan(loss[:4]).all() and torch.isfinite(loss[4])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ce_soft_half_types(device, dtype):
    x = (torch.randn(4, 10, device=device) * 3).to(dtype)
    q = torch.softmax(torch.randn(4, 10, device=device), 1).to(dtype)
    g = torch.ones(4, device=device)
    k = kernels(device)
    loss, lse, tsum = k.ce_soft_fwd(x, q, None, *opts(0.1))
    r_loss, r_lse, r_tsum, r_grad = ref_soft(x, q, None, 0.1, g)
    assert loss.dtype == tsum.dtype == torch.float32 and lse.dtype == torch.float64
    assert_close(loss, r_loss, atol=1e-5, rtol=1e-5)
    grad = k.ce_soft_bwd(g, x, q, None, lse, tsum, None, *opts(0.1))
    assert grad.dtype == dtype
    assert_close(grad, r_grad, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------- logit soft-capping
def ref_capped(x, target, w, eps, g, glse, cap, ignore_index=-100):
    """(loss, lse, grad) of the capped-logit kernels in float64 from torch's ops: z = cap *
    tanh(x / cap), the loss of either kind on z, grad = d/dx of sum(g * loss + glse * lse)."""
    x = x.detach().double().requires_grad_()
    c = x.shape[1]
    z = cap * torch.tanh(x / cap)
    logp, lse = torch.log_softmax(z, 1), torch.logsumexp(z, 1)
    w = torch.ones(c, dtype=torch.float64, device=x.device) if w is None else w.double()
    if target.dtype == torch.int64:
        ok = target != ignore_index
        safe = torch.where(ok, target, 0)
        loss = -logp.gather(1, safe[:, None])[:, 0] * w[safe]
        if eps:
            loss = (1 - eps) * loss - (eps / c) * (logp * w).sum(1)
        loss = torch.where(ok, loss, 0.0)
    else:
        q = (1 - eps) * target.double() + eps / c
        loss = -(w * q * logp).sum(1)
    ((g.double() * loss).sum() + (glse.double() * lse).sum()).backward()
    return loss.detach(), lse.detach(), x.grad


@pytest.mark.parametrize("kind", ["index", "soft"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_ce_softcap_matches_torch(device, block, kind, weighted, eps):
    n, c, cap = 7, 9, 2.5
    x = torch.randn(n, c + 2, dtype=torch.float64, device=device)[:, 2:] * 4
    x[0, 1], x[1, 2], x[2, 0] = 1e4, -1e4, -INF  # capped to +-cap: finite loss and gradient
    x[3] = 0.3  # all-equal row
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.5 if weighted else None
    g = torch.randn(n, dtype=torch.float64, device=device)
    glse = torch.randn(n, dtype=torch.float64, device=device)
    k = kernels(device)
    if kind == "index":
        t = torch.tensor([1, 2, 0, -100, 8, 4, 3], device=device)
        o = opts(eps, softcap=cap)
        loss, lse = k.ce_index_fwd(x, t, w, *o)
        grad = k.ce_index_bwd(g, x, t, w, lse, glse, *o)
    else:
        t = torch.softmax(torch.randn(n, c, dtype=torch.float64, device=device), 1)
        o = opts(eps, softcap=cap)
        loss, lse, tsum = k.ce_soft_fwd(x, t, w, *o)
        grad = k.ce_soft_bwd(g, x, t, w, lse, tsum, glse, *o)
    r_loss, r_lse, r_grad = ref_capped(x, t, w, eps, g, glse, cap)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, r_loss)
    assert_close(lse, r_lse)
    assert_close(grad, r_grad)


@triton.jit
def tanh_kernel(x_ptr, y_ptr, n, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tanh(tl.load(x_ptr + o, mask=o < n), IS_F64), mask=o < n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_within_four_eps(device, dtype):
    """The kernels' tanh within 4 eps of torch's (relative), on a dense grid, both branches and
    the switch at 0.55,
    with +-inf to +-1 and NaN kept."""
    special = torch.tensor([0.0, INF, -INF, NAN, 0.55, 1e-30, -1e-30, 20.0, 19.0], dtype=dtype)
    x = torch.cat([torch.linspace(-22, 22, 40001, dtype=dtype), special]).to(device)
    y = torch.empty_like(x)
    tanh_kernel[(triton.cdiv(x.numel(), 4096),)](
        x, y, x.numel(), IS_F64=dtype == torch.float64, BLOCK=4096
    )
    ref = torch.tanh(x.double())
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
    finite = torch.isfinite(ref)
    assert ((y.double() - ref).abs()[finite] <= 4 * ulp[finite]).all()
    assert y[-8].item() == 1.0 and y[-7].item() == -1.0 and math.isnan(y[-6].item())


# ---------------------------------------------------------------- vector widths and tiles
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vector_width_views(device, block, dtype):
    """Rows of 12 classes inside rows of 20 (VEC 2 for float64, 4 for float32), starting at
    a 16-byte boundary: the kernels' aligned() rewrites must leave every value unchanged."""
    n, c = 9, 12
    assert vector_width(torch.empty((), dtype=dtype).element_size(), c, 20) in (2, 4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 20, dtype=torch.float64, generator=g).to(device, dtype)[:, 4:16]
    q = torch.rand(n, 20, dtype=torch.float64, generator=g).to(device, dtype)[:, 2:14]
    t = torch.randint(0, c, (n,), generator=g).to(device)
    w = torch.rand(c, dtype=torch.float64, generator=g).to(device, x.dtype)
    gn = torch.randn(n, dtype=x.dtype, device=device)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    k = kernels(device)
    for eps in INDEX_EPS:
        loss, lse = k.ce_index_fwd(x, t, w, *opts(eps))
        r_loss, r_lse, r_grad = ref_index_loss(x, t, w, -100, gn, eps)
        assert_close(loss, r_loss, **tol)
        assert_close(k.ce_index_bwd(gn, x, t, w, lse, None, *opts(eps)), r_grad, **tol)
    loss, lse, tsum = k.ce_soft_fwd(x, q, w, *opts(0.2))
    r_loss, _, _, r_sgrad = ref_soft(x, q, w, 0.2, gn)
    assert_close(loss, r_loss, **tol)
    assert_close(k.ce_soft_bwd(gn, x, q, w, lse, tsum, None, *opts(0.2)), r_sgrad, **tol)
    y = k.softmax_fwd(x.contiguous(), 1, False)
    assert_close(y, torch.softmax(x.double(), 1), **tol)


def test_vector_width():
    assert vector_width(4, 1000, 1000) == 4  # 16 bytes: 128-bit loads
    assert vector_width(2, 1000, 1000) == 8
    assert vector_width(4, 10, 10) == 2
    assert vector_width(2, 10, 20) == 2
    assert vector_width(4, 12, 20) == 4
    assert vector_width(4, 12, 0) == 4  # a stride-0 expansion divides by anything
    assert vector_width(4, 13, 16) == 1
    assert vector_width(8, 4096) == 2


def test_tiles_bound_registers_and_coalesce(monkeypatch):
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    # At most 16 elements per thread of a one-row tile, 8 of a tile of several rows.
    assert num_warps(1, 8192) == 16 and num_warps(1, 4096) == 8 and num_warps(1, 1024) == 4
    assert num_warps(128, 16) == 8 and num_warps(4, 1024) == 16 and num_warps(64, 16) == 4
    # Softmax along a dim that is not last: lanes (contiguous) x classes, at least 32 bytes of
    # lanes once the classes no longer fit beside them.
    assert strided_tile_shape(512, 10, 4) == (256, 16, True)
    assert strided_tile_shape(512, 300, 4) == (8, 512, True)
    assert strided_tile_shape(512, 1000, 4) == (8, 512, False)
    assert strided_tile_shape(512, 262144, 2) == (16, 256, False)
    assert strided_tile_shape(20, 1500, 8) == (4, 1024, False)
    assert strided_tile_shape(3, 1000, 4) == (4, 1024, True)  # few lanes: the whole vector


# ---------------------------------------------------------------- plumbing
def test_block_env_must_be_power_of_two(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "6")
    with pytest.raises(ValueError, match=BLOCK_ENV):
        max_block_c()
    monkeypatch.setenv(BLOCK_ENV, "16")
    assert max_block_c() == 16


def test_interpreter_kernels_need_triton_interpret(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        se_triton.register_interpreter_kernels()


def test_interpreter_kernels_need_triton_interpret_before_import():
    """Without the interpreter, CPU tensors cannot reach the Triton kernels: registering them
    raises, and so does backend='triton' (a fresh process: the flag is read at Triton's import)."""
    code = (
        "import torch, pytest\n"
        "from softmax_ext import ops, triton as se_triton\n"
        "assert not se_triton.interpreter_active()\n"
        "for call in (se_triton.register_interpreter_kernels,\n"
        "             lambda: ops.kernels('triton', torch.device('cpu'))):\n"
        "    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):\n"
        "        call()\n"
        "op = ops.kernel('softmax_fwd', ops.BACKEND_TRITON)\n"
        "assert not op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CPU)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_kernels_serve_cpu():
    """The interpreter registers the launchers as the CPU kernels of the backend='triton' kernel
    operators (all of them, idempotently), distinct from the default ones (C++ on CPU);
    backend='triton' on CPU resolves to them."""
    if not INTERPRETED:
        pytest.skip("interpreter (CPU) path")
    se_triton.register_interpreter_kernels()
    se_triton.register_interpreter_kernels()
    assert sorted(se_triton.OPS) == sorted(ops.KERNELS)
    k = kernels("cpu")
    assert sorted(vars(k)) == sorted(ops.KERNELS)
    for name, op in vars(k).items():
        assert op is ops.kernel(name, ops.BACKEND_TRITON)
        assert op is not ops.kernel(name, ops.BACKEND_DEFAULT)
        assert op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CPU)
    x = torch.randn(3, 5, dtype=torch.float64)
    assert_close(k.softmax_fwd(x, 1, True), torch.log_softmax(x, 1))


@pytest.mark.parametrize("name", [n for n in ops.KERNELS if n.startswith("ce_")])
def test_launchers_take_the_whole_option_block(name):
    """A launcher called with fewer options than ops.LossOptions has raises, rather than quietly
    taking defaults for the missing ones."""
    from softmax_ext.triton import cross_entropy, soft_cross_entropy

    launcher = getattr(cross_entropy if "index" in name else soft_cross_entropy, name)
    tensors = {
        "ce_index_fwd": 3,
        "ce_index_bwd": 6,
        "ce_soft_fwd": 3,
        "ce_soft_bwd": 7,
        "ce_index_bwd_into": 7,
        "ce_soft_bwd_into": 8,
    }[name]
    args = [torch.empty(0, 0)] * tensors + list(opts(0.1))
    with pytest.raises(TypeError, match="loss options"):
        launcher(*args[:-1])


def test_register_cuda_kernels_is_idempotent():
    se_triton.register_cuda_kernels()
    se_triton.register_cuda_kernels()
    for name in ops.KERNELS:
        for backend in (ops.BACKEND_DEFAULT, ops.BACKEND_TRITON):
            assert ops.kernel(name, backend).has_kernel_for_dispatch_key(torch._C.DispatchKey.CUDA)


# ---------------------------------------------------------------- GPU only
@needs_cuda
def test_cuda_dispatch_and_graph_capture():
    """backend='auto' reaches the Triton kernels, and forward + backward capture in a CUDA graph
    (any host synchronisation would make the capture fail)."""
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    t[::7] = -100

    def step():
        x.grad = None
        loss = softmax_ext.cross_entropy(x, t, label_smoothing=0.1)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    graph.replay()
    torch.cuda.synchronize()
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr, t, label_smoothing=0.1)
    ref.backward()
    assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(device, dtype):
    """Fake kernels (ops.py) and the Triton kernels agree on dtypes, shapes and strides: the kernel
    operators backend='triton' calls (on CPU those the interpreter serves), on CUDA also those of
    backend='triton' (the same launchers), and the public operator with backend='triton'."""
    k = kernels(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(6, 11, device=device, dtype=dtype)
    t = torch.tensor([0, 3, -100, 10, 2, 2], device=device)
    w = torch.rand(11, device=device, dtype=acc)
    g = torch.randn(6, device=device, dtype=acc)
    p = torch.rand(6, 11, device=device).softmax(1).to(dtype)
    _, lse = k.ce_index_fwd(x, t, w, *opts(0.1))
    _, lse_s, tsum = k.ce_soft_fwd(x, p, w, *opts(0.1))
    y = k.softmax_fwd(x, 1, False)
    t7 = torch.tensor([9, 0, 3, -100, 6, 2, 2], device=device)[1:]  # odd offset, stride 1
    cases = [
        (k.softmax_fwd, (torch.randn(3, 5, 4, device=device, dtype=dtype), 1, False)),
        (k.softmax_fwd, (torch.randn(3, 5, 4, device=device, dtype=dtype), 2, True)),
        (k.softmax_bwd, (torch.randn(6, 11, device=device, dtype=dtype), y, 1, False)),
        (k.ce_index_fwd, (x, t, w, *opts(0.1))),
        (k.ce_index_fwd, (x[:, :7], t7, None, *opts(0.0, reduction=0))),
        (k.ce_index_bwd, (g, x, t, w, lse, None, *opts(0.1))),
        (k.ce_index_bwd, (g[:1].expand(6), x, t, None, lse, None, *opts())),
        (k.ce_index_bwd, (g, x, t, w, lse, torch.randn_like(g), *opts(0.1))),
        (k.ce_soft_fwd, (x, p, None, *opts())),
        (k.ce_soft_bwd, (g, x, p, w, lse_s, tsum, None, *opts(0.1))),
        (k.ce_soft_bwd, (g, x, p, w, lse_s, tsum, torch.randn_like(g), *opts(0.1))),
    ]
    if device == "cuda":
        triton_ce_index_fwd = ops.kernel("ce_index_fwd", ops.BACKEND_TRITON)
        triton_ce_index_bwd = ops.kernel("ce_index_bwd", ops.BACKEND_TRITON)
        cases += [
            (triton_ce_index_fwd, (x, t, None, *opts(0.1, reduction=0))),
            (triton_ce_index_bwd, (g, x, t, w, lse, None, *opts(0.1))),
        ]
    ce = ops.public_op("cross_entropy_index")
    backend = ops.backend_code("triton", torch.device(device))
    cases += [
        (ce, (x.clone().requires_grad_(), t, w, *opts(0.1), backend)),
        (ce, (x.clone().requires_grad_(), t, None, *opts(0.0, reduction=0), backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_cuda
def test_cuda_torch_compile():
    """The operators trace with their fake kernels (fullgraph) and run the Triton kernels."""
    x = torch.randn(32, 300, device="cuda")
    t = torch.randint(0, 300, (32,), device="cuda")
    se_triton.register_cuda_kernels()
    op = torch.compile(
        lambda x, t: torch.ops.softmax_ext.ce_index_fwd(x, t, None, *opts(0.1)), fullgraph=True
    )
    loss, lse = op(x, t)
    r_loss, r_lse, _ = ref_index_loss(x, t, None, -100, torch.ones(32, device="cuda"), 0.1)
    assert_close(loss, r_loss, atol=1e-5, rtol=1e-5)
    assert_close(lse, r_lse, atol=1e-5, rtol=1e-5)

    xg = x.clone().requires_grad_()
    fn = torch.compile(
        lambda x, t: softmax_ext.cross_entropy(x, t) + softmax_ext.log_softmax(x, 1).mean()
    )
    out = fn(xg, t)
    out.backward()
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr, t) + F.log_softmax(xr, 1).mean()
    ref.backward()
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_close(xg.grad, xr.grad, atol=1e-6, rtol=1e-4)


@needs_cuda
def test_cuda_out_of_range_target_is_nan_not_a_crash():
    import triton

    if triton.knobs.runtime.debug:
        pytest.skip("in Triton's debug mode the device assert fires instead")
    k = kernels("cuda")
    x = torch.randn(3, 5, device="cuda")
    t = torch.tensor([0, 7, -3], device="cuda")
    for eps in (0.0, 0.1):
        loss, lse = k.ce_index_fwd(x, t, None, *opts(eps))
        grad = k.ce_index_bwd(torch.ones(3, device="cuda"), x, t, None, lse, None, *opts(eps))
        assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
        assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).all()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_262144_classes(dtype):
    n, c = 4, 262144
    x = (torch.randn(n, c, device="cuda") * 2).to(dtype)
    t = torch.tensor([0, c - 1, 12345, -100], device="cuda")
    k = kernels("cuda")
    gn = torch.full((n,), 0.5, device="cuda")
    for eps in INDEX_EPS:
        loss, lse = k.ce_index_fwd(x, t, None, *opts(eps))
        r_loss, r_lse, r_grad = ref_index_loss(x, t, None, -100, gn, eps)
        assert_close(loss, r_loss, atol=1e-4, rtol=1e-5)
        assert_close(lse, r_lse, atol=1e-4, rtol=1e-5)
        grad = k.ce_index_bwd(gn, x, t, None, lse, None, *opts(eps))
        assert_close(grad, r_grad, atol=1e-6 if dtype == torch.float32 else 1e-4, rtol=1e-2)
    y = k.softmax_fwd(x, 1, False)
    assert_close(y, torch.softmax(x.double(), 1), atol=1e-7, rtol=1e-2)
    q = torch.softmax(torch.randn(n, c, device="cuda"), 1).to(dtype)
    loss, lse2, tsum = k.ce_soft_fwd(x, q, None, *opts(0.1))
    r_loss, _, _, r_sgrad = ref_soft(x, q, None, 0.1, gn)
    assert_close(loss, r_loss, atol=1e-4, rtol=1e-5)
    assert_close(
        k.ce_soft_bwd(gn, x, q, None, lse2, tsum, None, *opts(0.1)), r_sgrad, atol=1e-6, rtol=1e-2
    )


@needs_cuda
def test_cuda_2_31_elements():
    """Logits with more than 2**31 elements: offsets of the last rows overflow int32."""
    c = 32768
    n = 2**31 // c + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    assert x.numel() >= 2**31
    t = torch.randint(0, c, (n,), device="cuda")
    k = kernels("cuda")
    loss, lse = k.ce_index_fwd(x, t, None, *opts())
    tail = slice(n - 4, n)
    gn = torch.ones(n, device="cuda")
    r_loss, r_lse, r_grad = ref_index_loss(x[tail], t[tail], None, -100, gn[tail], 0.0)
    assert_close(loss[tail], r_loss, atol=1e-4, rtol=1e-5)
    assert_close(lse[tail], r_lse, atol=1e-4, rtol=1e-5)
    grad = k.ce_index_bwd(gn, x, t, None, lse, None, *opts())
    assert_close(grad[tail], r_grad, atol=1e-4, rtol=1e-2)
    del grad
    y = k.softmax_fwd(x, 1, True)
    assert_close(y[tail], torch.log_softmax(x[tail].double(), 1), atol=5e-2, rtol=1e-2)

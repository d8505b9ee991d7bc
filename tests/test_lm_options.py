"""The language-model options of cross_entropy: the z-loss (``lse_square_scale``), and the
``return_z_loss`` / ``return_lse`` outputs, against float64 references built from torch ops (torch
has neither), with every other option, layout and reduction, on every backend."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from test_cross_entropy import LAYOUTS, make_target

import softmax_ext as se

pytestmark = pytest.mark.parity

SCALE = 0.03


def reference(x, target, weight=None, ignore_index=-100, reduction="mean", eps=0.0, scale=0.0):
    """(loss with z-loss, z-loss, lse) from torch ops, in x's dtype (float64 in these tests)."""
    loss = F.cross_entropy(
        x, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps
    )
    lse = x.logsumexp(1 if x.dim() > 1 else 0)
    if target.is_floating_point():
        counted = torch.ones_like(lse, dtype=torch.bool)
    else:
        counted = target != ignore_index
    z_rows = torch.where(counted, scale * lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        z = z_rows
    elif reduction == "sum":
        z = z_rows.sum()
    else:
        z = z_rows.sum() / counted.sum()
    return loss + z, z, lse


def grads_of(outputs, x, seed=5):
    """d/dx of a random combination of every output (so each output's gradient is checked)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for out in outputs:
        total = total + (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    return torch.autograd.grad(total, x)[0]


@pytest.mark.parametrize(
    "layout,kind,reduction,eps,weighted",
    list(
        itertools.product(LAYOUTS, ["index", "soft"], ["mean", "sum", "none"], [0.0, 0.1], [0, 1])
    ),
)
def test_values_and_gradients_match_float64_reference(
    backend, device, layout, kind, reduction, eps, weighted
):
    shape = LAYOUTS[layout]
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, dtype=torch.float64, device=device) * 3
    target = make_target(shape, kind, device)
    weight = torch.rand(n_classes, dtype=torch.float64, device=device) + 0.5 if weighted else None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = se.cross_entropy(
        xa,
        target,
        weight,
        reduction=reduction,
        label_smoothing=eps,
        lse_square_scale=SCALE,
        return_z_loss=True,
        return_lse=True,
        backend=backend,
    )
    theirs = reference(xb, target, weight, reduction=reduction, eps=eps, scale=SCALE)
    assert len(ours) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads_of(ours, xa), grads_of(theirs, xb))


def test_outputs_follow_the_flags(backend, device):
    x = torch.randn(4, 6, device=device)
    t = torch.tensor([0, 5, -100, 2], device=device)
    plain = se.cross_entropy(x, t, backend=backend)
    assert isinstance(plain, torch.Tensor)
    loss, z = se.cross_entropy(x, t, return_z_loss=True, backend=backend)
    torch.testing.assert_close(loss, plain)  # no z-loss without a scale, but its term is reported
    assert z.item() == 0.0
    loss, lse = se.cross_entropy(x, t, return_lse=True, backend=backend)
    torch.testing.assert_close(lse, x.logsumexp(1))
    assert lse.dtype == torch.float32 and lse.shape == (4,)
    loss, z, lse = se.cross_entropy(
        x, t, lse_square_scale=0.5, return_z_loss=True, return_lse=True, backend=backend
    )
    torch.testing.assert_close(loss, plain + z)
    torch.testing.assert_close(z, 0.5 * (x.logsumexp(1)[[0, 1, 3]] ** 2).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch_ops(backend, device, dtype):
    """The z-loss and lse in float16/bfloat16/float32: error against float64 no larger than the
    same formula built from torch ops in that dtype (the lse is returned in float32)."""
    x64 = torch.randn(64, 50, dtype=torch.float64, device=device) * 4
    t = torch.randint(0, 50, (64,), device=device)
    t[::7] = -100
    exact = reference(x64, t, scale=SCALE)
    x = x64.to(dtype)
    ours = se.cross_entropy(
        x, t, lse_square_scale=SCALE, return_z_loss=True, return_lse=True, backend=backend
    )
    theirs = reference(x, t, scale=SCALE)
    for a, b, e in zip(ours, theirs, exact, strict=True):
        err_ours = (a.double() - e).abs().max().item()
        err_torch = (b.double() - e).abs().max().item()
        assert err_ours <= err_torch + 1e-6, (err_ours, err_torch)


def test_lse_gradient_reaches_ignored_rows(backend, device):
    """An ignored row has no loss and no z-loss, but its log-sum-exp still depends on its logits."""
    x = torch.randn(3, 20, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([-100, 4, -100], device=device)
    _, lse = se.cross_entropy(x, t, reduction="none", return_lse=True, backend=backend)
    (g,) = torch.autograd.grad(lse.sum(), x)
    torch.testing.assert_close(g, x.detach().softmax(1))
    loss, z = se.cross_entropy(
        x, t, lse_square_scale=1.0, return_z_loss=True, reduction="sum", backend=backend
    )
    (g,) = torch.autograd.grad(loss, x)
    assert (g[0] == 0).all() and (g[2] == 0).all() and (g[1] != 0).any()


@pytest.mark.parametrize("kind", ["index", "soft"])
def test_gradcheck_and_gradgradcheck(backend, device, kind):
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    target = make_target((5, 4), kind, device)

    def fn(x):
        return se.cross_entropy(
            x, target, label_smoothing=0.1, lse_square_scale=0.2, return_lse=True, backend=backend
        )

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


BAD_VALUES = [("lse_square_scale", v) for v in (-1.0, float("nan"), float("inf"), "0.1")] + [
    ("softcap", v) for v in (0.0, -1.0, float("nan"), float("inf"), True, "30")
]


@pytest.mark.parametrize("option,bad", BAD_VALUES)
def test_bad_values_raise(backend, option, bad):
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=option):
        se.cross_entropy(x, t, backend=backend, **{option: bad})
    with pytest.raises(ValueError, match=option):
        se.CrossEntropyLoss(backend=backend, **{option: bad})


def test_module_passes_the_options(backend, device):
    x = torch.randn(6, 5, device=device)
    t = torch.randint(0, 5, (6,), device=device)
    module = se.CrossEntropyLoss(
        label_smoothing=0.1, lse_square_scale=0.1, return_z_loss=True, backend=backend
    )
    loss, z = module(x, t)
    ref_loss, ref_z, _ = reference(x.double(), t, eps=0.1, scale=0.1)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.double(), ref_z, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(module)


def test_compiled_fullgraph_matches_eager():
    x = torch.randn(8, 11, requires_grad=True)
    t = torch.randint(0, 11, (8,))

    def fn(x, t):
        loss, z, lse = se.cross_entropy(
            x, t, lse_square_scale=1e-2, return_z_loss=True, return_lse=True
        )
        return loss + lse.sum() * 1e-3, z

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = fn(x, t), compiled(x, t)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a[0], x)[0]
    gb = torch.autograd.grad(b[0], x)[0]
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("kind", ["index", "soft"])
def test_torch_backend_gives_the_same(backend, device, kind):
    """backend="torch" (and torch.jit.trace, which uses it) builds the extras from torch's ops."""
    x = torch.randn(3, 6, 2, dtype=torch.float64, device=device)
    target = make_target((3, 6, 2), kind, device)
    kw = dict(reduction="none", lse_square_scale=0.1, return_z_loss=True, return_lse=True)
    ours = se.cross_entropy(x, target, backend=backend, **kw)
    theirs = se.cross_entropy(x, target, backend="torch", **kw)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


# ---- logit soft-capping --------------------------------------------------------------------------

CAP = 2.5


def capped(x, cap=CAP):
    return cap * torch.tanh(x / cap)


@pytest.mark.parametrize(
    "layout,kind,reduction,eps,weighted",
    list(
        itertools.product(LAYOUTS, ["index", "soft"], ["mean", "sum", "none"], [0.0, 0.1], [0, 1])
    ),
)
def test_softcap_matches_float64_reference(backend, device, layout, kind, reduction, eps, weighted):
    shape = LAYOUTS[layout]
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, dtype=torch.float64, device=device) * 4
    target = make_target(shape, kind, device)
    weight = torch.rand(n_classes, dtype=torch.float64, device=device) + 0.5 if weighted else None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = dict(reduction=reduction, label_smoothing=eps)
    ours = se.cross_entropy(
        xa,
        target,
        weight,
        **kw,
        softcap=CAP,
        lse_square_scale=SCALE,
        return_lse=True,
        backend=backend,
    )
    theirs = reference(capped(xb), target, weight, reduction=reduction, eps=eps, scale=SCALE)
    theirs = (theirs[0], theirs[2])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads_of(ours, xa), grads_of(theirs, xb))


@pytest.mark.parametrize("n_classes", [10, 50])  # the 16-row block path and the row path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_softcap_low_precision_no_worse_than_torch_ops(backend, device, dtype, n_classes):
    x64 = torch.randn(64, n_classes, dtype=torch.float64, device=device) * 8
    x64[0, :3] = torch.tensor([1e4, -1e4, -float("inf")], dtype=torch.float64)
    t = torch.randint(0, n_classes, (64,), device=device)
    t[::7] = -100
    gen = torch.Generator().manual_seed(3)
    up = torch.randn(64, generator=gen, dtype=torch.float64)

    def run(x, fn):
        x = x.clone().requires_grad_()
        loss, lse = fn(x)
        (g,) = torch.autograd.grad(loss + (lse * up.to(lse.dtype)).sum(), x)
        return loss.double(), lse.double(), g.double()

    def ours_fn(x):
        return se.cross_entropy(x, t, softcap=CAP, return_lse=True, backend=backend)

    def torch_fn(x):
        z = capped(x)
        return F.cross_entropy(z, t), z.float().logsumexp(
            1
        ) if x.dtype != torch.float64 else z.logsumexp(1)

    exact = run(x64, torch_fn)
    ours, theirs = run(x64.to(dtype), ours_fn), run(x64.to(dtype), torch_fn)
    for a, b, e in zip(ours, theirs, exact, strict=True):
        assert torch.isfinite(a).all()
        err_ours = (a - e).abs().max().item()
        err_torch = (b - e).abs().max().item()
        assert err_ours <= 1.5 * err_torch + 1e-6, (err_ours, err_torch)


@pytest.mark.parametrize("kind", ["index", "soft"])
def test_softcap_gradcheck_and_gradgradcheck(backend, device, kind):
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True) * 3
    target = make_target((5, 4), kind, device)

    def fn(x):
        return se.cross_entropy(
            x,
            target,
            label_smoothing=0.1,
            softcap=1.5,
            lse_square_scale=0.2,
            return_lse=True,
            backend=backend,
        )

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_tanh_within_four_eps(backend, device, dtype):
    """One-class rows with softcap=1: the log-sum-exp is the kernels' tanh of the logit itself
    (on the 16-row block path), within 4 eps of torch's relative to it, on a dense grid, both
    sides of every branch point, tiny values and +-inf (to +-1) and NaN."""
    x = torch.cat(
        [
            torch.linspace(-12, 12, 48001, dtype=torch.float64),
            torch.logspace(-30, 1, 3001, dtype=torch.float64),
            torch.tensor([0.0, 0.55, 0.1242, 10.4, float("inf"), -float("inf"), float("nan")]),
        ]
    ).to(dtype=dtype, device=device)
    t = torch.zeros(len(x), dtype=torch.int64, device=device)
    _, lse = se.cross_entropy(
        x[:, None], t, softcap=1.0, return_lse=True, reduction="none", backend=backend
    )
    ref = torch.tanh(x.double())
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
    finite = torch.isfinite(ref)
    assert ((lse.double() - ref).abs()[finite] <= 4 * ulp[finite]).all()
    assert lse[-3].item() == 1.0 and lse[-2].item() == -1.0 and math.isnan(lse[-1].item())

"""cross_entropy against torch.nn.functional.cross_entropy: values, gradients, every option."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_no_worse_than_torch, assert_same_nonfinite, max_err

import softmax_ext as se

pytestmark = pytest.mark.parity

C = 7
LAYOUTS = {"C": (C,), "NC": (5, C), "NCd": (3, C, 4), "NCdd": (2, C, 3, 2)}


def make_target(shape, kind, device, dtype=torch.float64, ignore=True):
    """Index targets (with a few ignore_index entries) or class probabilities for logits `shape`."""
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    if kind == "soft":
        return torch.rand(shape, dtype=dtype, device=device).softmax(0 if len(shape) == 1 else 1)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, n_classes, tshape, device=device)
    if ignore and t.numel() > 2:
        t.view(-1)[1] = -100
    return t


def run_both(x, target, backend, **kw):
    """(ours, torch) values and logit gradients for the same inputs, upstream grads random."""
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ours = se.cross_entropy(xa, target, backend=backend, **kw)
    theirs = F.cross_entropy(xb, target, **kw)
    # The same upstream gradient on every call with this shape, whatever the dtype (values rounded
    # to bfloat16 are exact in all four), so that a float64 reference run sees it too.
    gen = torch.Generator(device=theirs.device).manual_seed(99)
    g = torch.randn(theirs.shape, generator=gen, device=theirs.device, dtype=torch.float64)
    g = g.to(torch.bfloat16).to(theirs.dtype)
    ours.backward(g)
    theirs.backward(g)
    return ours, theirs, xa.grad, xb.grad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["index", "soft"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_matches_torch_float64(layout, kind, weighted, reduction, smoothing, backend, device):
    shape = LAYOUTS[layout]
    x = torch.randn(shape, dtype=torch.float64, device=device) * 3
    t = make_target(shape, kind, device)
    w = torch.rand(C, dtype=torch.float64, device=device) + 0.1 if weighted else None
    ours, theirs, ga, gb = run_both(
        x, t, backend, weight=w, reduction=reduction, label_smoothing=smoothing
    )
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_ignore_index_values(ignore_index, backend, device):
    x = torch.randn(9, C, dtype=torch.float64, device=device)
    t = torch.tensor([0, 3, 3, 1, 0, 6, 3, 2, 0], device=device)
    w = torch.rand(C, dtype=torch.float64, device=device)
    for kw in (
        dict(),
        dict(weight=w),
        dict(weight=w, label_smoothing=0.2),
        dict(label_smoothing=0.5),
    ):
        ours, theirs, ga, gb = run_both(x, t, backend, ignore_index=ignore_index, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-11, atol=1e-12)


def test_uint8_targets(backend, device):
    x = torch.randn(6, C, dtype=torch.float64, device=device)
    t = torch.randint(0, C, (6,), device=device, dtype=torch.uint8)
    ours, theirs, ga, gb = run_both(x, t, backend)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("kind", ["index", "soft"])
def test_gradcheck(kind, backend, device):
    x = torch.randn(4, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = make_target((4, 5, 3), kind, device)
    w = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    for reduction in ("none", "mean", "sum"):
        fn = lambda x, reduction=reduction: se.cross_entropy(
            x, t, weight=w, reduction=reduction, label_smoothing=0.15, backend=backend
        )
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


def test_soft_target_gradient_wrt_target(backend, device):
    x = torch.randn(5, C, dtype=torch.float64, device=device)
    p = torch.rand(5, C, dtype=torch.float64, device=device).softmax(1)
    w = torch.rand(C, dtype=torch.float64, device=device)
    pa, pb = p.clone().requires_grad_(), p.clone().requires_grad_()
    se.cross_entropy(x, pa, weight=w, label_smoothing=0.2, backend=backend).backward()
    F.cross_entropy(x, pb, weight=w, label_smoothing=0.2).backward()
    torch.testing.assert_close(pa.grad, pb.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["index", "soft"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_low_precision_no_worse_than_torch(dtype, kind, smoothing, backend, device):
    shape = (16, 301)
    x64 = torch.randn(shape, dtype=torch.float64, device=device) * 4
    x = x64.to(dtype)
    t = make_target(shape, kind, device, dtype=dtype)
    w = (torch.rand(301, device=device) + 0.5).to(dtype)
    ref_kw = dict(weight=w.double(), label_smoothing=smoothing)
    t64 = t.double() if kind == "soft" else t
    for reduction in ("none", "mean"):
        ours, theirs, ga, gb = run_both(
            x, t, backend, weight=w, reduction=reduction, label_smoothing=smoothing
        )
        ref, _, gref, _ = run_both(x.double(), t64, "torch", reduction=reduction, **ref_kw)
        eps = torch.finfo(dtype).eps
        assert ours.dtype == dtype
        assert_no_worse_than_torch(ours, theirs, ref, atol=4 * eps * float(ref.abs().max()))
        assert_no_worse_than_torch(ga, gb, gref, atol=4 * eps * float(gref.abs().max()))


def hostile_logits(device, dtype=torch.float64):
    rows = [
        [1e4, -1e4, 1e4 - 1, 0.0, -5.0, 3.0, 1e4 - 3],  # huge values
        [0.0, float("-inf"), 1.0, float("-inf"), 2.0, 0.5, -1.0],  # -inf entries
        [2.5] * C,  # all equal
        [1000.0 + v for v in (0.1, -0.3, 0.7, 0.0, 1.2, -2.0, 0.4)],  # shifted by +1000
        [-1e4, -1e4 + 2, -1e4 + 1, -1e4, -1e4 - 5, -1e4, -1e4 + 0.5],  # large negative
    ]
    return torch.tensor(rows, dtype=dtype, device=device)


@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
def test_hostile_values_float64(smoothing, weighted, backend, device):
    x = hostile_logits(device)
    t = torch.tensor([0, 2, 4, 5, 1], device=device)
    w = torch.rand(C, dtype=torch.float64, device=device) + 0.1 if weighted else None
    ours, theirs, ga, gb = run_both(
        x, t, backend, weight=w, reduction="none", label_smoothing=smoothing
    )
    assert_same_nonfinite(ours, theirs)
    assert max_err(ours, theirs) < 1e-9
    assert max_err(ga, gb) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hostile_values_low_precision(dtype, backend, device):
    x64 = hostile_logits(device)
    x = x64.to(dtype)
    t = torch.tensor([0, 2, 4, 5, 1], device=device)
    ours, theirs, ga, gb = run_both(x, t, backend, reduction="none")
    ref, _, gref, _ = run_both(x.double(), t, "torch", reduction="none")
    assert_same_nonfinite(ours.float(), theirs.float())
    eps = torch.finfo(dtype).eps
    assert_no_worse_than_torch(ours, theirs, ref, atol=4 * eps)
    assert_no_worse_than_torch(ga, gb, gref, atol=4 * eps)


def test_inf_and_nan_rows_match_torch(backend, device):
    x = torch.randn(4, C, dtype=torch.float64, device=device)
    x[0, 2] = float("inf")
    x[1, 3] = float("nan")
    x[2, :] = float("-inf")
    t = torch.tensor([2, 0, 1, 3], device=device)
    t[3] = 3
    x[3, 3] = float("-inf")  # true class at -inf: infinite loss
    ours = se.cross_entropy(x, t, reduction="none", backend=backend)
    theirs = F.cross_entropy(x, t, reduction="none")
    assert_same_nonfinite(ours, theirs)


def test_all_ignored_and_empty(backend, device):
    x = torch.randn(4, C, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    for kw in (
        dict(),
        dict(label_smoothing=0.1),
        dict(weight=torch.ones(C, dtype=torch.float64, device=device)),
    ):
        loss = se.cross_entropy(x, t, backend=backend, **kw)
        assert loss.isnan()
        assert se.cross_entropy(x, t, reduction="sum", backend=backend, **kw).item() == 0.0
    (g,) = torch.autograd.grad(se.cross_entropy(x, t, reduction="sum", backend=backend), x)
    assert torch.count_nonzero(g) == 0
    empty = torch.randn(0, C, dtype=torch.float64, device=device, requires_grad=True)
    te = torch.zeros(0, dtype=torch.long, device=device)
    assert se.cross_entropy(empty, te, backend=backend).isnan()
    assert se.cross_entropy(empty, te, reduction="none", backend=backend).shape == (0,)
    loss = se.cross_entropy(empty, te, reduction="sum", backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, C)
    assert se.cross_entropy(
        empty, torch.zeros(0, C, dtype=torch.float64, device=device), backend=backend
    ).isnan()


def test_one_class(backend, device):
    x = torch.randn(5, 1, dtype=torch.float64, device=device)
    t = torch.zeros(5, dtype=torch.long, device=device)
    ours, theirs, ga, gb = run_both(x, t, backend, label_smoothing=0.3)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ga, gb)


def test_non_contiguous_inputs_and_target_slices(backend, device):
    wide = torch.randn(6, 2 * C + 3, dtype=torch.float64, device=device)
    cases = {
        "column slice": wide[:, 1 : C + 1],
        "transposed": torch.randn(C, 6, dtype=torch.float64, device=device).t(),
        "row step": torch.randn(12, C, dtype=torch.float64, device=device)[::2],
    }
    base_t = torch.randint(0, C, (13,), device=device)
    targets = {"contiguous": base_t[:6].clone(), "odd start": base_t[1:7], "step": base_t[::2][:6]}
    for (xn, x), (tn, t) in itertools.product(cases.items(), targets.items()):
        ours, theirs, ga, gb = run_both(x, t, backend, label_smoothing=0.1)
        torch.testing.assert_close(ours, theirs, msg=f"{xn} / {tn}")
        torch.testing.assert_close(ga, gb, msg=f"{xn} / {tn}")
    soft = torch.rand(6, 2 * C, dtype=torch.float64, device=device)[:, ::2].softmax(1)
    ours, theirs, ga, gb = run_both(cases["column slice"], soft, backend)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ga, gb)


def test_channels_last_spatial(backend, device):
    x = torch.randn(2, C, 3, 4, dtype=torch.float64, device=device).to(
        memory_format=torch.channels_last
    )
    t = torch.randint(0, C, (2, 3, 4), device=device)
    ours, theirs, ga, gb = run_both(x, t, backend)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ga, gb)


# Float accumulation has two CPU code paths: rows of up to 32 classes go 16 at a time through
# transposed blocks, longer rows through chunks. The float64 tests above reach neither.
@pytest.mark.parametrize("n_classes", [1, 10, 32, 33, 301])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "weighted,smoothing", [(False, 0.0), (True, 0.0), (False, 0.2), (True, 0.2)]
)
def test_float_paths_every_option(n_classes, dtype, weighted, smoothing, backend, device):
    rows = 45  # two full blocks of 16 and a partial one of 13
    wide = torch.randn(rows, n_classes + 5, dtype=torch.float64, device=device) * 4
    x64 = wide[:, 2 : 2 + n_classes]  # a row stride that is not the class count
    x = x64.to(dtype)
    t = torch.randint(0, n_classes, (rows,), device=device)
    t[[3, 17, 44]] = -100  # ignored rows inside full and partial blocks
    w = (torch.rand(n_classes, device=device) + 0.5).to(dtype) if weighted else None
    eps = torch.finfo(dtype).eps
    for reduction in ("none", "mean", "sum"):
        kw = dict(reduction=reduction, label_smoothing=smoothing)
        ours, theirs, ga, gb = run_both(x, t, backend, weight=w, **kw)
        ref, _, gref, _ = run_both(
            x.double(), t, "torch", weight=None if w is None else w.double(), **kw
        )
        assert ours.dtype == dtype
        assert_no_worse_than_torch(ours, theirs, ref, atol=4 * eps * float(ref.abs().max()))
        # scale of the per-row upstream gradient: with one class every gradient is a rounding
        # residual of terms that cancel, of that size
        g_row = (4.0 / rows if reduction == "mean" else 4.0) * (1.5 if weighted else 1.0)
        g_scale = max(float(gref.abs().max()), g_row)
        assert_no_worse_than_torch(ga, gb, gref, atol=4 * eps * g_scale)
        assert torch.all(ga[[3, 17, 44]] == 0)


@pytest.mark.parametrize("n_classes", [7, 33])
def test_float32_hostile_and_nonfinite_rows(n_classes, backend, device):
    x = torch.randn(20, n_classes, device=device)
    x[0, 2] = float("inf")
    x[1, 3] = float("nan")
    x[2, :] = float("-inf")
    x[3, :] = 2.5  # all equal
    x[4, :] += 1000.0  # shifted
    x[5, :2] = torch.tensor([1e4, -1e4])  # huge
    x[6, 1] = float("-inf")  # the true class at -inf
    x[7, :] = float("-inf")  # ignored: a zero gradient even so
    t = torch.randint(0, n_classes, (20,), device=device)
    t[6], t[7] = 1, -100
    for smoothing in (0.0, 0.1):
        ours, theirs, ga, gb = run_both(x, t, backend, reduction="none", label_smoothing=smoothing)
        assert_same_nonfinite(ours, theirs)
        # torch's gradient of an ignored all -inf row is NaN (0 times its NaN softmax); an ignored
        # row contributes no gradient here, so it is 0
        assert torch.all(ga[7] == 0)
        ga[7], gb[7] = 0.0, 0.0
        assert_same_nonfinite(ga, gb)
        ref, _, gref, _ = run_both(
            x.double(), t, "torch", reduction="none", label_smoothing=smoothing
        )
        finite = ref.isfinite()
        eps = torch.finfo(torch.float32).eps
        assert_no_worse_than_torch(ours[finite], theirs[finite], ref[finite], atol=8 * eps * 1e4)
        gfinite = gref.isfinite().all(1)
        assert_no_worse_than_torch(ga[gfinite], gb[gfinite], gref[gfinite], atol=4 * eps)


@pytest.mark.parametrize("n_classes", [5, 100, 5000])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_non_finite_weight_of_an_unused_class(n_classes, bad, reduction, backend, device):
    # weight = 1 / class_counts with a class absent from the data: torch's loss and gradient stay
    # finite (the class weights enter only the smoothing term); a used class's row alone is NaN.
    x = torch.randn(6, n_classes, dtype=torch.float32, device=device, requires_grad=True)
    w = torch.ones(n_classes, device=device)
    w[2] = bad
    for t in ([0, 1, 0, 1, 3, 4], [0, 1, 2, 1, 3, 4]):  # class 2 unused, then used once
        t = torch.tensor(t, device=device)
        out = []
        for fn, kw in ((se.cross_entropy, {"backend": backend}), (F.cross_entropy, {})):
            loss = fn(x, t, weight=w, reduction=reduction, **kw)
            (g,) = torch.autograd.grad(loss.sum(), x)
            out.append((loss.detach(), g))
        (ours, g_ours), (theirs, g_theirs) = out
        assert_same_nonfinite(ours, theirs)
        assert_same_nonfinite(g_ours, g_theirs)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        torch.testing.assert_close(g_ours, g_theirs, equal_nan=True)

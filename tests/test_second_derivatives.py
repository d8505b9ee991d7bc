"""Second derivatives: torch's softmax, log_softmax and cross_entropy are twice differentiable, and
so are ours (gradgradcheck in float64), for every option; the first order stays the kernels'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softmax_ext as se

pytestmark = pytest.mark.parity


def _index_target(device):
    return torch.tensor([0, 3, -100, 4, 2, 3], device=device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_gradgradcheck_index_targets(reduction, weighted, label_smoothing, backend, device):
    x = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = _index_target(device)
    w = torch.rand(5, dtype=torch.float64, device=device) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    fn = lambda x: se.cross_entropy(x, t, backend=backend, **kw)
    assert torch.autograd.gradgradcheck(fn, (x,))
    # and the values of the second derivative are torch's
    g = torch.randn(6, 5, dtype=torch.float64, device=device)
    hvps = []
    for f in (fn, lambda x: F.cross_entropy(x, t, **kw)):
        (gx,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad(gx, x, g)[0])
    torch.testing.assert_close(*hvps)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gradgradcheck_soft_targets(reduction, weighted, label_smoothing, backend, device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    p = torch.rand(4, 5, dtype=torch.float64, device=device).softmax(1).requires_grad_()
    w = torch.rand(5, dtype=torch.float64, device=device) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    assert torch.autograd.gradgradcheck(
        lambda x, p: se.cross_entropy(x, p, backend=backend, **kw), (x, p)
    )


def test_gradgradcheck_spatial_index_targets(backend, device):
    x = torch.randn(2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([[0, 1, 3], [2, -100, 1]], device=device)
    assert torch.autograd.gradgradcheck(
        lambda x: se.cross_entropy(x, t, label_smoothing=0.1, backend=backend), (x,)
    )


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, dim", [((4, 6), 1), ((3, 5, 4), 1), ((3, 5, 4), 0)])
def test_gradgradcheck_softmax(fn, shape, dim, backend, device):
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    f = getattr(se, fn)
    assert torch.autograd.gradgradcheck(lambda x: f(x, dim, backend=backend), (x,))


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_hessian_vector_product_softmax_is_torchs(fn, backend, device):
    x = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    g, v = (torch.randn(5, 7, dtype=torch.float64, device=device) for _ in range(2))
    hvps = []
    for f in (lambda x: getattr(se, fn)(x, 1, backend=backend), lambda x: getattr(F, fn)(x, 1)):
        (gx,) = torch.autograd.grad(f(x), x, g, create_graph=True)
        hvps.append(torch.autograd.grad(gx, x, v)[0])
    torch.testing.assert_close(*hvps)

"""Bad input raises the exception type PyTorch raises, with a message that names the problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softmax_ext as se

pytestmark = pytest.mark.parity

X = lambda device: torch.randn(4, 5, device=device)  # noqa: E731
T = lambda device, *v: torch.tensor(v, device=device)  # noqa: E731

CASES = {
    "target too large": (lambda d: (X(d), T(d, 0, 1, 2, 7)), {}, "out of bounds"),
    "target negative": (lambda d: (X(d), T(d, 0, 1, 2, -3)), {}, "out of bounds"),
    "int32 target": (lambda d: (X(d), T(d, 0, 1, 2, 3).int()), {}, "Long or Byte"),
    "float index target": (lambda d: (X(d), T(d, 0.0, 1.0, 2.0, 3.0)), {}, "Long or Byte"),
    "bool target": (lambda d: (X(d), T(d, 0, 1, 1, 0).bool()), {}, "Long or Byte"),
    "long target of input's shape": (
        lambda d: (X(d), torch.zeros(4, 5, dtype=torch.long, device=d)),
        {},
        "floating point",
    ),
    "multi-target": (lambda d: (X(d), torch.zeros(4, 6, device=d)), {}, "multi-target"),
    "batch mismatch": (lambda d: (X(d), T(d, 0, 1, 2)), {}, "batch_size"),
    "spatial mismatch": (
        lambda d: (torch.randn(2, 5, 3, device=d), torch.zeros(2, 4, dtype=torch.long, device=d)),
        {},
        "target size",
    ),
    "weight size": (
        lambda d: (X(d), T(d, 0, 1, 2, 3)),
        {"weight": lambda d: torch.ones(3, device=d)},
        "weight",
    ),
    "weight 2-d": (
        lambda d: (X(d), T(d, 0, 1, 2, 3)),
        {"weight": lambda d: torch.ones(5, 1, device=d)},
        "weight",
    ),
    "weight dtype": (
        lambda d: (X(d), T(d, 0, 1, 2, 3)),
        {"weight": lambda d: torch.ones(5, dtype=torch.float64, device=d)},
        "Double",
    ),
    "ignore_index with soft targets": (
        lambda d: (X(d), torch.rand(4, 5, device=d)),
        {"ignore_index": 1},
        "ignore_index",
    ),
    "label_smoothing > 1": (
        lambda d: (X(d), T(d, 0, 1, 2, 3)),
        {"label_smoothing": 1.5},
        "label_smoothing",
    ),
    "unknown reduction": (lambda d: (X(d), T(d, 0, 1, 2, 3)), {"reduction": "avg"}, "reduction"),
    "integer logits": (
        lambda d: (torch.ones(4, 5, dtype=torch.long, device=d), T(d, 0, 1, 2, 3)),
        {},
        "floating point",
    ),
}


def _materialise(kw, device):
    return {k: (v(device) if callable(v) else v) for k, v in kw.items()}


@pytest.mark.parametrize("case", CASES)
def test_bad_cross_entropy_input_raises_like_torch(case, backend, device):
    make, kw, words = CASES[case]
    x, t = make(device)
    kw = _materialise(kw, device)
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(x, t, **kw)
    with pytest.raises(theirs.type) as ours:
        se.cross_entropy(x, t, backend=backend, **kw)
    assert words.lower() in str(ours.value).lower()


def test_negative_label_smoothing_is_rejected(backend, device):
    # PyTorch silently ignores a negative label_smoothing; the issue asks for [0, 1] to be enforced.
    with pytest.raises(RuntimeError, match="label_smoothing"):
        se.cross_entropy(X(device), T(device, 0, 1, 2, 3), label_smoothing=-0.1, backend=backend)


def test_out_of_range_target_in_one_of_many_rows(backend, device):
    t = torch.zeros(64, dtype=torch.long, device=device)
    t[37] = 5
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        se.cross_entropy(torch.randn(64, 5, device=device), t, backend=backend)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_bad_softmax_input_raises_like_torch(fn, backend, device):
    ours, theirs = getattr(se, fn), getattr(F, fn)
    for args in (
        (torch.ones(3, 4, device=device), 2),
        (torch.ones(3, 4, device=device), -3),
        (torch.ones(3, dtype=torch.long, device=device), 0),
    ):
        with pytest.raises(Exception) as want:
            theirs(*args)
        with pytest.raises(want.type):
            ours(*args, backend=backend)


def test_weight_that_needs_a_gradient_is_refused(backend, device):
    # index targets, as torch's nll_loss (soft targets give the weight its gradient)
    w = torch.rand(5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        se.cross_entropy(X(device), T(device, 0, 1, 2, 3), weight=w, backend=backend)
    with torch.no_grad():  # no gradient wanted: fine
        se.cross_entropy(X(device), T(device, 0, 1, 2, 3), weight=w, backend=backend)
    se.cross_entropy(X(device), T(device, 0, 1, 2, 3), weight=w.detach(), backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        se.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        se.CrossEntropyLoss(backend="nope")

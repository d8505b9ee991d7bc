"""Comparison helpers: float64 references and 'no worse than PyTorch' checks for low precision."""

from __future__ import annotations

import torch
from torch import Tensor


def max_err(a: Tensor, ref: Tensor) -> float:
    """Largest absolute difference, treating matching non-finite values (nan/inf) as equal."""
    a, ref = a.double().cpu(), ref.double().cpu()
    same = (a == ref) | (a.isnan() & ref.isnan())
    diff = (a - ref).abs().masked_fill(same, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_no_worse_than_torch(ours: Tensor, theirs: Tensor, ref: Tensor, atol: float) -> None:
    """Our error against the float64 reference is at most PyTorch's own error plus atol."""
    e_ours, e_torch = max_err(ours, ref), max_err(theirs, ref)
    assert e_ours <= e_torch + atol, f"our error {e_ours:.3g} > torch's {e_torch:.3g} + {atol:.1g}"


def assert_same_nonfinite(a: Tensor, b: Tensor) -> None:
    a, b = a.cpu(), b.cpu()
    assert torch.equal(a.isnan(), b.isnan()), "NaN positions differ"
    assert torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0)), "+inf positions differ"
    assert torch.equal(a.isinf() & (a < 0), b.isinf() & (b < 0)), "-inf positions differ"

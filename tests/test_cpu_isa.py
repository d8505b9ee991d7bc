"""The CPU kernel sets, one per instruction set (avx512, avx2, baseline): the widest the CPU runs is
picked once per process, or the one SOFTMAX_EXT_CPU_ISA names. `make test-isa` runs the whole
suite again under each narrower set; here, the choice itself and a cross-check of the sets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from softmax_ext import _cpp

ISAS = ("avx512", "avx2", "baseline")

# Each case's outputs and gradients, printed as float64 lists: the same function in every set.
_CASES = r"""
import sys, torch, softmax_ext as se
from softmax_ext import _cpp
torch.manual_seed(0)
out = []
def grads(y, *xs):
    ramp = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)
    return [y] + list(torch.autograd.grad((y * ramp).sum(), xs))
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for n, c in ((37, 7), (21, 32), (19, 45), (5, 1000), (3, 2100)):
        x = (torch.randn(n, c) * 5).to(dtype)
        x[0, : c // 2] = -float("inf")
        x[1] = 3.0
        x = x.requires_grad_()
        t = torch.randint(0, c, (n,)); t[2] = -100
        w = torch.rand(c).to(dtype)
        p = torch.softmax(torch.randn(n, c), -1).to(dtype)
        out += grads(se.softmax(x, -1), x) + grads(se.log_softmax(x, -1), x)
        out += grads(se.cross_entropy(x, t, w, label_smoothing=0.1), x)
        lm = dict(reduction="none", softcap=3.0, lse_square_scale=1e-2)
        out += grads(se.cross_entropy(x, t, **lm), x)
        out += grads(se.cross_entropy(x, p), x)
    xt = torch.randn(3, 9, 13).to(dtype).requires_grad_()  # class dim not last: the tiles
    out += grads(se.softmax(xt, 1), xt) + grads(se.log_softmax(xt, 1), xt)
print(_cpp.module()._cpu_isa())
torch.save([(str(o.dtype), o.detach().double()) for o in out], sys.argv[1])
"""


# A few units in the last place of each dtype (the sums run in another order).
_TOLERANCE = {
    "torch.float64": 1e-12,
    "torch.float32": 1e-5,
    "torch.float16": 4e-3,
    "torch.bfloat16": 1e-2,
}


def _python(code: str, isa: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SOFTMAX_EXT_CPU_ISA=isa)
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


_WHICH = (
    "import torch, softmax_ext; from softmax_ext import _cpp\n"
    "softmax_ext.softmax(torch.randn(2, 3), -1)\n"
    "print(_cpp.module()._cpu_isa())"
)


def test_the_set_in_use_is_named() -> None:
    assert _cpp.module()._cpu_isa() in ISAS


def test_auto_picks_the_same_set_as_no_setting() -> None:
    auto, unset = _python(_WHICH, "auto"), _python(_WHICH, "")
    assert auto.returncode == 0 and unset.returncode == 0, auto.stderr + unset.stderr
    assert auto.stdout.strip() == unset.stdout.strip()
    assert auto.stdout.strip() in ISAS


def test_baseline_can_be_forced() -> None:
    out = _python(_WHICH, "baseline")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "baseline"


def test_an_unknown_set_is_refused_with_the_valid_names() -> None:
    out = _python(_WHICH, "avx9")
    assert out.returncode != 0
    assert "SOFTMAX_EXT_CPU_ISA must be auto, avx512, avx2 or baseline, got 'avx9'" in out.stderr


@pytest.fixture(scope="module")
def widest_results(tmp_path_factory) -> tuple:
    """The cases under the widest set: (its name, the results file)."""
    path = tmp_path_factory.mktemp("isa") / "widest.pt"
    widest = _python(_CASES, "auto", str(path))
    assert widest.returncode == 0, widest.stderr
    return widest.stdout.strip(), path


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_each_set_computes_what_the_widest_computes(isa: str, widest_results, tmp_path) -> None:
    """Values and gradients, every dtype, block, row, chunked and tile paths, hostile rows: the same
    up to rounding (the sets sum in different orders; every result is checked against torch by
    the rest of the suite under the widest set, and by `make test-isa` under each)."""
    widest_isa, widest_path = widest_results
    narrow = _python(_CASES, isa, str(tmp_path / "narrow.pt"))
    assert narrow.returncode == 0, narrow.stderr
    if narrow.stdout.strip() != isa:
        pytest.skip(f"this CPU lacks {isa}")
    if widest_isa == isa:
        pytest.skip(f"{isa} is already the widest set here")
    a, b = torch.load(widest_path), torch.load(tmp_path / "narrow.pt")
    for i, ((dtype, u), (_, v)) in enumerate(zip(a, b, strict=True)):
        tol = _TOLERANCE[dtype]
        torch.testing.assert_close(v, u, rtol=tol, atol=tol, equal_nan=True, msg=f"{i}: {dtype}")
        assert torch.equal(u.isnan(), v.isnan()) and torch.equal(u.isinf(), v.isinf()), i

"""The CPU kernels' float16 conversions (csrc/convert_f16.cpp) against torch's, bit for bit.

The kernels use the CPU's conversion instructions (AVX-512 or F16C) where it has them and exact
integer arithmetic elsewhere; both are checked here on every half value and on float32 values
around every rounding boundary, at lengths that exercise the vector tails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from softmax_ext import _cpp

IMPLS = [pytest.param(False, id="kernels"), pytest.param(True, id="portable")]


def _same_bits_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> None:
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    ints = torch.int32 if a.dtype == torch.float32 else torch.int16
    assert torch.equal(a[~nan_a].view(ints), b[~nan_b].view(ints))


def _float_boundaries() -> torch.Tensor:
    """float32 values at and around every float16 rounding boundary, plus random bit patterns."""
    h = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    f = h.float()
    f = f[torch.isfinite(f)]
    up = torch.nextafter(f, torch.full_like(f, float("inf")))
    down = torch.nextafter(f, torch.full_like(f, -float("inf")))
    # midpoints between neighbouring halves: the ties that round to even
    s = torch.sort(torch.unique(f)).values
    mid = (s[1:].double() + s[:-1].double()).div(2).float()
    special = torch.tensor(
        [65504.0, 65519.99, 65520.0, 65536.0, 1e30, 2**-24, 2**-25, 2**-26, 2**-14, 6e-8, 0.0]
    )
    special = torch.cat(
        [special, -special, torch.tensor([float("inf"), -float("inf"), float("nan")])]
    )
    g = torch.Generator().manual_seed(0)
    rand_bits = torch.randint(-(2**31), 2**31, (1 << 18,), generator=g, dtype=torch.int64)
    rand = rand_bits.to(torch.int32).view(torch.float32)
    return torch.cat([f, up, down, mid, torch.nextafter(mid, s[1:]), special, rand])


@pytest.mark.parametrize("portable", IMPLS)
def test_every_half_widens_exactly(portable: bool) -> None:
    h = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    _same_bits_or_both_nan(_cpp.module()._f16_to_f32(h.contiguous(), portable), h.float())


@pytest.mark.parametrize("portable", IMPLS)
def test_floats_round_to_nearest_even(portable: bool) -> None:
    f = _float_boundaries()
    _same_bits_or_both_nan(_cpp.module()._f32_to_f16(f, portable).float(), f.half().float())


@pytest.mark.parametrize("portable", IMPLS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 47])
def test_tails_touch_nothing_past_n(portable: bool, n: int) -> None:
    """Every length converts exactly; the values past n in a larger buffer stay unread."""
    base = torch.randn(64) * 100
    src = base[:n].contiguous()
    _same_bits_or_both_nan(_cpp.module()._f32_to_f16(src, portable).float(), src.half().float())
    h = src.half()
    _same_bits_or_both_nan(_cpp.module()._f16_to_f32(h, portable), h.float())


def test_impl_is_named_and_can_be_forced_portable() -> None:
    assert _cpp.module()._f16_conversion_impl() in ("avx512", "f16c", "portable")
    code = "from softmax_ext import _cpp; print(_cpp.module()._f16_conversion_impl())"
    env = dict(os.environ, SOFTMAX_EXT_F16C="0")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "portable"

"""The backward kernels' ``_into`` variants (``ce_index_bwd_into``, ``ce_soft_bwd_into``): the same
gradient as the allocating kernels, bit for bit, written into a given tensor, including over the
logits themselves (the fused linear head's chunks), for every option; their argument checks."""

from __future__ import annotations

import itertools

import pytest
import torch

import softmax_ext  # noqa: F401  (defines the operators, registers the C++ kernels)
from softmax_ext import ops

pytestmark = pytest.mark.parity

_OPTIONS = list(
    itertools.product(
        (0.0, 0.2),  # label smoothing
        (False, True),  # class weights
        (0.0, 5.0),  # softcap
        (False, True),  # a log-sum-exp gradient
    )
)


def _options(eps: float, softcap: float) -> ops.LossOptions:
    return ops.LossOptions(ignore_index=2, label_smoothing=eps, reduction=0, softcap=softcap)


def _inputs(rows: int, classes: int, dtype: torch.dtype, device, with_w: bool, hostile: bool):
    x = torch.randn(rows, classes, dtype=dtype, device=device) * 3
    if hostile and rows >= 3 and classes >= 3:
        x[0, 1] = 1e4
        x[1] = 7.0  # an all-equal row
        x[2, 0] = float("-inf")
    acc = ops.acc_dtype(dtype)
    w = torch.rand(classes, dtype=acc, device=device) + 0.5 if with_w else None
    g = torch.randn(rows, dtype=acc, device=device)
    glse = torch.randn(rows, dtype=acc, device=device)
    return x, w, g, glse


def _index_case(backend, device, rows, classes, dtype, eps, with_w, cap, with_glse, hostile):
    code = ops.backend_code(backend, device)
    x, w, g, glse = _inputs(rows, classes, dtype, device, with_w, hostile)
    t = torch.randint(0, classes, (rows,), device=device)
    t[::4] = 2  # ignored rows (ignore_index 2)
    o = _options(eps, cap)
    lse = ops.kernel("ce_index_fwd", code)(x, t, w, *o)[1]
    gl = glse if with_glse else None
    ref = ops.kernel("ce_index_bwd", code)(g, x, t, w, lse, gl, *o)
    into = ops.kernel("ce_index_bwd_into", code)
    out = torch.full_like(x, float("nan"))
    assert into(g, x, t, w, lse, gl, out, *o) is None
    over = x.clone()
    into(g, over, t, w, lse, gl, over, *o)
    return ref, out, over


def _soft_case(backend, device, rows, classes, dtype, eps, with_w, cap, with_glse, hostile):
    code = ops.backend_code(backend, device)
    x, w, g, glse = _inputs(rows, classes, dtype, device, with_w, hostile)
    q = torch.rand(rows, classes, device=device).softmax(1).to(dtype)
    o = _options(eps, cap)
    _, lse, tsum = ops.kernel("ce_soft_fwd", code)(x, q, w, *o)
    gl = glse if with_glse else None
    ref = ops.kernel("ce_soft_bwd", code)(g, x, q, w, lse, tsum, gl, *o)
    into = ops.kernel("ce_soft_bwd_into", code)
    out = torch.full_like(x, float("nan"))
    assert into(g, x, q, w, lse, tsum, gl, out, *o) is None
    over = x.clone()
    into(g, over, q, w, lse, tsum, gl, over, *o)
    return ref, out, over


@pytest.mark.parametrize("case", [_index_case, _soft_case], ids=["index", "soft"])
@pytest.mark.parametrize("eps,with_w,cap,with_glse", _OPTIONS)
@pytest.mark.parametrize(
    "rows,classes,dtype",
    [
        (37, 10, torch.float32),  # the C++ blocked path (C <= 32), a partial last block
        (9, 300, torch.float32),  # the row path, a partial last chunk
        (6, 77, torch.float64),
        (11, 45, torch.bfloat16),
        (5, 2100, torch.float16),  # rows longer than one C++ chunk
    ],
)
def test_into_and_over_the_logits_equal_the_allocating_kernel(
    backend, device, case, eps, with_w, cap, with_glse, rows, classes, dtype
):
    ref, out, over = case(backend, device, rows, classes, dtype, eps, with_w, cap, with_glse, True)
    for got in (out, over):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def test_into_large_float32_streams_over_the_logits(backend, device):
    """float32 gradients of 256 MiB and more take the C++ kernels' streaming stores."""
    if backend == "triton" and device.type == "cpu":
        pytest.skip("too large for the interpreter")
    ref, out, over = _index_case(
        backend, device, 2048, 32768, torch.float32, 0.1, True, 0.0, False, False
    )
    torch.testing.assert_close(over, ref, rtol=0, atol=0)


def _args(backend, device, soft: bool):
    code = ops.backend_code(backend, device)
    x = torch.randn(4, 6, device=device)
    w = torch.rand(6, device=device)
    g = torch.ones(4, device=device)
    o = _options(0.1, 0.0)
    if soft:
        q = torch.rand(4, 6, device=device).softmax(1)
        _, lse, tsum = ops.kernel("ce_soft_fwd", code)(x, q, w, *o)
        return ops.kernel("ce_soft_bwd_into", code), (g, x, q, w, lse, tsum, None), o, x
    t = torch.tensor([0, 5, 2, 3], device=device)
    lse = ops.kernel("ce_index_fwd", code)(x, t, w, *o)[1]
    return ops.kernel("ce_index_bwd_into", code), (g, x, t, w, lse, None), o, x


@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_into_refuses_a_bad_grad_logits(backend, device, soft):
    op, args, o, x = _args(backend, device, soft)
    bad = {
        "shape": torch.empty(4, 5, device=device),
        "dtype": torch.empty(4, 6, dtype=torch.float64, device=device),
        "contiguity": torch.empty(6, 4, device=device).t(),
    }
    for what, out in bad.items():
        with pytest.raises((RuntimeError, ValueError), match="grad_logits"):
            op(*args, out, *o)
            pytest.fail(f"a grad_logits of the wrong {what} was taken")
    # a partial overlap with the logits (shifted by one row), and an overlap with another input
    wide = torch.randn(5, 6, device=device)
    args_wide = (args[0], wide[1:], *args[2:])
    with pytest.raises(RuntimeError, match="memory location"):
        op(*args_wide, wide[:4], *o)
    g_alias = torch.ones(24, device=device)
    with pytest.raises(RuntimeError, match="memory location"):
        op(g_alias[:4], *args[1:], g_alias.view(4, 6), *o)


def test_into_fake_kernels_return_nothing():
    x, t = torch.randn(3, 5), torch.tensor([0, 4, 1])
    lse = ops.kernel("ce_index_fwd")(x, t, None, *_options(0.0, 0.0))[1]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        f = [mode.from_tensor(a) for a in (torch.ones(3), x, t, lse, x)]
        assert (
            ops.kernel("ce_index_bwd_into")(
                f[0], f[1], f[2], None, f[3], None, f[4], *_options(0.0, 0.0)
            )
            is None
        )
    assert str(ops.kernel("ce_index_bwd_into")._schema).endswith("-> ()")

"""torch's whole interface, as a drop-in must have it: positional calls with torch's argument order
and deprecated arguments, autocast, inference_mode, and the odd inputs torch accepts."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import softmax_ext as se

HALF_TYPES = [torch.bfloat16, torch.float16]


# ---- positional calls and deprecated arguments -------------------------------------------------


def test_cross_entropy_positional_order_is_torchs():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 2, 4, 1, 2, 3, 2])
    w = torch.rand(5, dtype=torch.float64) + 0.5
    # (input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    ours = se.cross_entropy(x, t, w, None, 2, None, "sum", 0.1)
    theirs = F.cross_entropy(x, t, w, None, 2, None, "sum", 0.1)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "size_average, reduce", [(False, None), (None, False), (True, True), (False, True)]
)
def test_cross_entropy_legacy_size_average_and_reduce(size_average, reduce):
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ours = se.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)


def test_cross_entropy_elementwise_mean_is_mean_with_torchs_warning():
    x, t = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.warns(UserWarning, match="elementwise_mean"):
        ours = se.cross_entropy(x, t, reduction="elementwise_mean")
    torch.testing.assert_close(ours, F.cross_entropy(x, t))
    with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
        se.cross_entropy(x, t, reduction="bogus")


def test_cross_entropy_loss_module_positional_order_is_torchs():
    w = torch.rand(6) + 0.5
    ours, theirs = se.CrossEntropyLoss(w, None, 5), torch.nn.CrossEntropyLoss(w, None, 5)
    assert ours.ignore_index == theirs.ignore_index == 5
    x, t = torch.randn(8, 6), torch.tensor([5, 0, 1, 5, 2, 3, 4, 0])
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    with pytest.warns(UserWarning, match="size_average and reduce"):
        legacy = se.CrossEntropyLoss(None, False)
    assert legacy.reduction == "sum"
    torch.testing.assert_close(legacy(x, t), F.cross_entropy(x, t, reduction="sum"))


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_positional_order_is_torchs(fn):
    x = torch.randn(3, 4)
    # (input, dim, _stacklevel, dtype)
    ours = getattr(se, fn)(x, 1, 3, torch.float64)
    theirs = getattr(F, fn)(x, 1, 3, torch.float64)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_implicit_dim_warns_at_the_callers_line(fn):
    with pytest.warns(UserWarning, match=f"Implicit dimension choice for {fn}") as record:
        getattr(se, fn)(torch.randn(2, 3))
    assert record[0].filename == __file__
    module = "Softmax" if fn == "softmax" else "LogSoftmax"
    places = []
    for lib in (se, torch.nn):  # the modules pass torch's _stacklevel: the same frame as torch's
        with pytest.warns(UserWarning) as record:
            getattr(lib, module)()(torch.randn(2, 3))
        places.append((record[0].filename, record[0].lineno))
    assert places[0] == places[1]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 5)])
def test_softmax2d(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ours, theirs = se.Softmax2d()(x), torch.nn.Softmax2d()(x)
    torch.testing.assert_close(ours, theirs)
    g = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, g)[0] for y in (ours, theirs)))
    with pytest.raises(ValueError, match="expected input to be 3D or 4D, got 2D instead"):
        se.Softmax2d()(torch.randn(3, 4))


# ---- autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("kind", ["index", "soft"])
def test_autocast_cpu_cross_entropy_runs_in_float32(dtype, kind):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 7)
    x = torch.randn(9, 16)
    t = torch.randint(0, 7, (9,)) if kind == "index" else torch.rand(9, 7).softmax(1)
    w = torch.rand(7) + 0.5
    results = []
    for fn in (se.cross_entropy, F.cross_entropy):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            logits = model(x)
            assert logits.dtype == dtype
            loss = fn(logits, t, weight=w, label_smoothing=0.1)
        loss.backward()
        results.append((loss, model.weight.grad.clone()))
    (ours, g_ours), (theirs, g_theirs) = results
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_autocast_cpu_softmax_keeps_the_dtype_as_torch(dtype, fn):
    x = torch.randn(5, 6, dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        ours, theirs = getattr(se, fn)(x, 1), getattr(F, fn)(x, 1)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_autocast_cuda_follows_torchs_policy(dtype):
    # CUDA autocast: cross_entropy, softmax and log_softmax all run in float32 (softmax's
    # fp32_set_opt_dtype policy: an explicit dtype wins)
    x = torch.randn(6, 9, device="cuda", dtype=dtype)
    t = torch.randint(0, 9, (6,), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        pairs = [
            (se.cross_entropy(x, t), F.cross_entropy(x, t)),
            (se.softmax(x, 1), F.softmax(x, 1)),
            (se.log_softmax(x, 1), F.log_softmax(x, 1)),
            (se.softmax(x, 1, dtype=torch.float64), F.softmax(x, 1, dtype=torch.float64)),
        ]
    for ours, theirs in pairs:
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs)


# ---- inference_mode and the reuse of large CPU buffers -----------------------------------------


def test_inference_mode_buffers_never_reach_training():
    shape = (1024, 4096)  # 16 MiB in float32: large enough for the C++ reuse cache
    with torch.inference_mode():
        for _ in range(2):  # fill both cache slots with inference tensors
            se.softmax(torch.randn(shape), dim=1)
    w = torch.randn(shape, requires_grad=True)
    y = se.softmax(w, 1)  # raised "Inference tensors cannot be saved for backward"
    assert not y.is_inference()
    y[:, 0].sum().backward()
    assert not w.grad.is_inference()
    x = torch.randn(shape, requires_grad=True)
    se.cross_entropy(x, torch.randint(0, shape[1], shape[:1])).backward()
    assert not x.grad.is_inference()
    x.grad.requires_grad_()  # raises on an inference tensor
    with torch.inference_mode():  # and the other way round
        out = se.softmax(torch.randn(shape), dim=1)
    assert out.is_inference()


# ---- inputs torch accepts ----------------------------------------------------------------------


def test_one_dimensional_non_contiguous_logits():
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    ours, theirs = (
        se.cross_entropy(x[::2], torch.tensor(1)),
        F.cross_entropy(x[::2], torch.tensor(1)),
    )
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(*(torch.autograd.grad(y, x)[0] for y in (ours, theirs)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_classes_with_soft_targets(reduction):
    x = torch.rand(5, 0, requires_grad=True)
    ours = se.cross_entropy(x, torch.rand(5, 0), reduction=reduction)
    theirs = F.cross_entropy(x, torch.rand(5, 0), reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert torch.equal(ours.signbit(), theirs.signbit())  # torch's -0


def test_soft_targets_promote_a_float64_weight():
    x, p = torch.randn(4, 6), torch.rand(4, 6).softmax(1)
    w = torch.rand(6, dtype=torch.float64) + 0.5
    ours, theirs = se.cross_entropy(x, p, weight=w), F.cross_entropy(x, p, weight=w)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(RuntimeError, match="expected scalar type Float but found Double"):
        se.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=w)


def test_nan_label_smoothing_is_ignored_as_in_torch():
    x, t = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    nan = float("nan")
    torch.testing.assert_close(
        se.cross_entropy(x, t, label_smoothing=nan), F.cross_entropy(x, t, label_smoothing=nan)
    )


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1])
def test_ignore_index_beyond_int64_is_a_value_error(ignore_index):
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError):
        F.cross_entropy(x, t, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="64-bit"):
        se.cross_entropy(x, t, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_class_weight_gradient_with_soft_targets(reduction, label_smoothing):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    p = torch.rand(5, 7, dtype=torch.float64).softmax(1)
    w = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    grads = []
    for fn in (se.cross_entropy, F.cross_entropy):
        loss = fn(x, p, **kw)
        grads.append(torch.autograd.grad(loss.sum(), (x, w)))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(
        lambda w: se.cross_entropy(x.detach(), p, **{**kw, "weight": w}), (w,)
    )


def test_class_weight_requiring_grad_with_index_targets_raises_as_torch():
    x, t = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2])
    w = torch.rand(4, requires_grad=True)
    message = "not differentiable with respect to argument 'weight'"
    with pytest.raises(RuntimeError, match=message):
        F.cross_entropy(x, t, weight=w)
    with pytest.raises(RuntimeError, match=message):
        se.cross_entropy(x, t, weight=w)
    with torch.no_grad():  # no graph, no error (as torch)
        torch.testing.assert_close(
            se.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w)
        )


# ---- torch.func and TorchScript ----------------------------------------------------------------

FUNC_CASES = {
    "cross_entropy_index": (
        lambda x: se.cross_entropy(x, torch.tensor([0, 2, 1, 4]), label_smoothing=0.1),
        lambda x: F.cross_entropy(x, torch.tensor([0, 2, 1, 4]), label_smoothing=0.1),
    ),
    "cross_entropy_soft": (
        lambda x: se.cross_entropy(x, torch.full((4, 5), 0.2, dtype=torch.float64)),
        lambda x: F.cross_entropy(x, torch.full((4, 5), 0.2, dtype=torch.float64)),
    ),
    "softmax": (lambda x: se.softmax(x, 1)[:, 0].sum(), lambda x: F.softmax(x, 1)[:, 0].sum()),
    "log_softmax": (
        lambda x: se.log_softmax(x, 0)[1].sum(),
        lambda x: F.log_softmax(x, 0)[1].sum(),
    ),
}


@pytest.mark.parametrize("name", list(FUNC_CASES))
def test_torch_func_transforms(name):
    ours, theirs = FUNC_CASES[name]
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.grad(ours)(x), torch.func.grad(theirs)(x))
    (_, vjp_ours), (_, vjp_theirs) = torch.func.vjp(ours, x), torch.func.vjp(theirs, x)
    one = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(vjp_ours(one), vjp_theirs(one))
    torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(theirs)(x))
    batch = torch.randn(3, 4, 5, dtype=torch.float64)  # per-sample gradients
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(ours))(batch),
        torch.func.vmap(torch.func.grad(theirs))(batch),
    )


MODULE_CASES = {
    "CrossEntropyLoss": (
        lambda: se.CrossEntropyLoss(torch.rand(5) + 0.5, label_smoothing=0.1),
        (torch.randn(4, 5), torch.tensor([0, 2, 1, 4])),
    ),
    "CrossEntropyLoss_soft": (
        lambda: se.CrossEntropyLoss(),
        (torch.randn(4, 5), torch.rand(4, 5).softmax(1)),
    ),
    "Softmax": (lambda: se.Softmax(dim=1), (torch.randn(4, 5),)),
    "LogSoftmax": (lambda: se.LogSoftmax(dim=1), (torch.randn(4, 5),)),
    "Softmax2d": (lambda: se.Softmax2d(), (torch.randn(2, 3, 4, 5),)),
}


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_jit_trace_save_load_and_script(name, tmp_path):
    make, args = MODULE_CASES[name]
    module = make()
    expected = module(*args)
    traced = torch.jit.trace(module, args)
    torch.jit.save(traced, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    torch.testing.assert_close(loaded(*args), expected)
    x = args[0].clone().requires_grad_()
    loaded(x, *args[1:]).sum().backward()  # still differentiable
    assert x.grad is not None
    scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(*args), expected)


def test_non_finite_weight_with_smoothing_stays_non_finite():
    # the documented difference: torch's loss is inf, ours inf or NaN; never a finite number
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 0, 1])
    w = torch.ones(5)
    w[2] = float("inf")
    for reduction in ("mean", "sum", "none"):
        ours = se.cross_entropy(x, t, weight=w, label_smoothing=0.1, reduction=reduction)
        theirs = F.cross_entropy(x, t, weight=w, label_smoothing=0.1, reduction=reduction)
        assert not theirs.isfinite().any() and not ours.isfinite().any()


def _kernels_run(fn) -> set:
    """The softmax_ext kernels that ``fn()`` runs, from the profiler's operator events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("softmax_ext::")}


def test_torch_func_runs_the_kernels_not_a_fallback():
    # torch.func transforms go through the operators' C++ nodes: the forward kernels run (the
    # first-order backward under torch.func differentiates torch's formula, as double backward)
    x, t = torch.randn(4, 5), torch.tensor([0, 2, 1, 4])
    ran = _kernels_run(lambda: torch.func.grad(lambda x: se.cross_entropy(x, t))(x))
    assert "softmax_ext::ce_index_fwd" in ran
    batch = torch.randn(3, 4, 5)
    ran = _kernels_run(lambda: torch.func.vmap(lambda x: se.log_softmax(x, 1))(batch))
    assert "softmax_ext::softmax_fwd" in ran
    ran = _kernels_run(lambda: torch.func.jacrev(lambda x: se.softmax(x, 1))(x))
    assert "softmax_ext::softmax_fwd" in ran

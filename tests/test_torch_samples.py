"""PyTorch's own test samples through softmax_ext: the OpInfo samples of cross_entropy, softmax and
log_softmax (plain, with dtype) and the ModuleInfo samples of CrossEntropyLoss, Softmax, LogSoftmax
and Softmax2d. Each is run by softmax_ext and by torch and compared: values, gradients, second
derivatives (gradgradcheck, small samples), and the same samples made non-contiguous."""

from __future__ import annotations

import functools

import pytest
import torch

import softmax_ext as se

common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

pytestmark = pytest.mark.parity

# (OpInfo name, variant) -> our function
OPS = {
    ("nn.functional.cross_entropy", ""): se.cross_entropy,
    ("softmax", ""): se.softmax,
    ("softmax", "with_dtype"): se.softmax,
    ("log_softmax", ""): se.log_softmax,
    ("log_softmax", "with_dtype"): se.log_softmax,
}
MODULES = {
    torch.nn.CrossEntropyLoss: se.CrossEntropyLoss,
    torch.nn.Softmax: se.Softmax,
    torch.nn.LogSoftmax: se.LogSoftmax,
    torch.nn.Softmax2d: se.Softmax2d,
}
GRADGRAD_MAX_NUMEL = 64  # gradgradcheck is quadratic in the input size


@functools.lru_cache(maxsize=None)
def _op_info(key):
    """The OpInfo and its float64 samples (made once: the tests only read them)."""
    info = next(o for o in common_methods.op_db if (o.name, o.variant_test_name) == key)
    return info, list(info.sample_inputs("cpu", torch.float64, requires_grad=True))


@functools.lru_cache(maxsize=None)
def _module_info(cls):
    info = next(m for m in common_modules.module_db if m.module_cls is cls)
    inputs = info.module_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=True, training=True
    )
    return info, inputs


def _op_samples():
    return [
        pytest.param(key, i, id=f"{key[0]}.{key[1] or 'plain'}-{i}")
        for key in OPS
        for i in range(len(_op_info(key)[1]))
    ]


def _module_samples():
    return [
        pytest.param(cls, i, id=f"{cls.__name__}-{i}")
        for cls in MODULES
        for i in range(len(_module_info(cls)[1]))
    ]


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _differentiable(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]


def _compare(ours_fn, theirs_fn, args, backend):
    """Values, gradients and (small inputs, C++ backend) second derivatives of ours vs torch's."""
    ours, theirs = ours_fn(*args), theirs_fn(*args)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    where = _differentiable(args)
    inputs = [args[i] for i in where]
    if not inputs or not ours.requires_grad:
        return
    g = torch.randn_like(theirs)
    got = torch.autograd.grad(ours, inputs, g, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(theirs, inputs, g, allow_unused=True, retain_graph=True)
    for a, b, x in zip(got, want, inputs, strict=True):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        torch.testing.assert_close(a, b, equal_nan=True)
    small = sum(x.numel() for x in inputs) <= GRADGRAD_MAX_NUMEL
    if small and backend == "cpp" and ours.numel() > 0:

        def fn(*diff):
            full = list(args)
            for i, x in zip(where, diff, strict=True):
                full[i] = x
            return ours_fn(*full)

        assert torch.autograd.gradgradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("key, index", _op_samples())
@pytest.mark.parametrize("contiguous", [True, False])
def test_opinfo_samples(key, index, contiguous, backend, device):
    info, samples = _op_info(key)
    sample = samples[index]
    if not contiguous:
        sample = sample.noncontiguous()
    args = [_to(sample.input, device), *(_to(a, device) for a in sample.args)]
    kwargs = {k: _to(v, device) for k, v in sample.kwargs.items()}
    ours_fn = OPS[key]
    _compare(
        lambda *a: ours_fn(*a, **kwargs, backend=backend),
        lambda *a: info.op(*a, **kwargs),
        args,
        backend,
    )


@pytest.mark.parametrize("cls, index", _module_samples())
def test_moduleinfo_samples(cls, index, backend, device):
    sample = _module_info(cls)[1][index]
    ctor = sample.constructor_input
    kwargs = {k: _to(v, device) for k, v in ctor.kwargs.items()}
    ours = MODULES[cls](*ctor.args, **kwargs, backend=backend)
    theirs = cls(*ctor.args, **kwargs)
    args = [_to(a, device) for a in sample.forward_input.args]
    _compare(ours, theirs, args, backend)
    assert ours.state_dict().keys() == theirs.state_dict().keys()

"""Each operator is defined once (softmax_ext/ops.py); every registration follows from it."""

from __future__ import annotations

import pytest
import torch

import softmax_ext  # noqa: F401  (defines the operators, registers the C++ kernels)
from softmax_ext import ops


def _has_kernel(qualname: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


@pytest.mark.parametrize("name", list(ops.PUBLIC))
def test_public_operators_have_one_cpp_autograd_node(name):
    qualname = f"{ops.NAMESPACE}::{name}"
    assert str(getattr(torch.ops.softmax_ext, name).default._schema) == qualname + ops.schema(name)
    assert _has_kernel(qualname, "Autograd")
    assert _has_kernel(qualname, "CompositeExplicitAutograd")
    assert not _has_kernel(qualname, "CPU")  # the node calls the kernels; it is no kernel itself


@pytest.mark.parametrize("name", list(ops.KERNELS))
def test_kernels_have_cpu_kernels_and_the_same_schema_in_both_namespaces(name):
    for namespace in (ops.NAMESPACE, ops.TRITON_NAMESPACE):
        op = getattr(getattr(torch.ops, namespace), name).default
        assert str(op._schema) == f"{namespace}::{name}{ops.schema(name)}"
    assert _has_kernel(f"{ops.NAMESPACE}::{name}", "CPU")  # the C++ kernels
    assert not _has_kernel(f"{ops.NAMESPACE}::{name}", "Autograd")  # only the nodes differentiate


def test_every_cross_entropy_operator_ends_with_the_option_block():
    fields = list(ops.LossOptions._fields)
    for name in [n for n in {**ops.PUBLIC, **ops.KERNELS} if "ce_" in n or "cross" in n]:
        args = [a.name for a in getattr(torch.ops.softmax_ext, name).default._schema.arguments]
        if args[-1] == "backend":
            args = args[:-1]
        assert args[-len(fields) :] == fields, name


def test_fake_kernels_match_the_cpu_kernels():
    x, t, w = torch.randn(5, 7), torch.tensor([0, 6, -100, 3, 3]), torch.rand(7)
    p = torch.rand(5, 7).softmax(1)
    cases = {
        "softmax": (x, 1, True, 0),
        "cross_entropy_index": (x, t, w, -100, 0.1, 0, 0.0, 0.0, 0),
        "cross_entropy_index_z": (x.half(), t, w, -100, 0.1, 1, 0.5, 0.0, 0),
        "cross_entropy_soft": (x, p, None, -100, 0.0, 1, 0.0, 0.0, 0),
        "softmax_fwd": (x, 0, False),
        "ce_index_fwd": (x, t, w, -100, 0.1, 1, 0.0, 0.0),
        "ce_soft_fwd": (x, p, w, -100, 0.1, 1, 0.0, 0.0),
    }
    for name, args in cases.items():
        op = getattr(torch.ops.softmax_ext, name.removesuffix("_z")).default
        real = op(*args)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake, strict=True):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), name

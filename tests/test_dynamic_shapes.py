"""Dynamic shapes: one graph for every batch size under torch.compile(dynamic=True), and
torch.export with a dynamic batch dimension, for every public function (issue: a training loop's
last, shorter batch must not recompile)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.export import Dim, export

import softmax_ext as se

C = 10

# name -> (softmax_ext, torch) as functions of logits x and index targets t
CASES = {
    "index_mean": (
        lambda x, t: se.cross_entropy(x, t, label_smoothing=0.1),
        lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1),
    ),
    "index_weighted_mean": (
        lambda x, t: se.cross_entropy(x, t, weight=torch.arange(1.0, C + 1)),
        lambda x, t: F.cross_entropy(x, t, weight=torch.arange(1.0, C + 1)),
    ),
    "index_none": (
        lambda x, t: se.cross_entropy(x, t, reduction="none").sum(),
        lambda x, t: F.cross_entropy(x, t, reduction="none").sum(),
    ),
    "soft_mean": (
        lambda x, t: se.cross_entropy(x, F.one_hot(t, C).float() * 0.9 + 0.01),
        lambda x, t: F.cross_entropy(x, F.one_hot(t, C).float() * 0.9 + 0.01),
    ),
    "softmax": (
        lambda x, t: se.softmax(x, 1).square().sum(),
        lambda x, t: F.softmax(x, 1).square().sum(),
    ),
    "log_softmax": (
        lambda x, t: se.log_softmax(x, 1).square().sum(),
        lambda x, t: F.log_softmax(x, 1).square().sum(),
    ),
}


def _inputs(n: int):
    return torch.randn(n, C, requires_grad=True), torch.randint(0, C, (n,))


@pytest.mark.parametrize("name", list(CASES))
def test_compile_dynamic_one_graph_for_every_batch_size(name):
    ours, theirs = CASES[name]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(ours, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (3, 4, 7, 12, 13, 31, 64, 65, 100, 256):  # more sizes than the recompile limit
        x, t = _inputs(n)
        out = compiled(x, t)
        (g,) = torch.autograd.grad(out, x)
        ref = theirs(x, t)
        (g_ref,) = torch.autograd.grad(ref, x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(g, g_ref)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name", list(CASES))
def test_export_with_a_dynamic_batch_dim(name):
    ours, theirs = CASES[name]

    class Loss(torch.nn.Module):
        def forward(self, x, t):
            return ours(x, t)

    batch = Dim("batch", min=2)
    x, t = _inputs(8)
    program = export(Loss(), (x.detach(), t), dynamic_shapes={"x": {0: batch}, "t": {0: batch}})
    for n in (2, 5, 33):
        x, t = _inputs(n)
        torch.testing.assert_close(program.module()(x.detach(), t), theirs(x.detach(), t))

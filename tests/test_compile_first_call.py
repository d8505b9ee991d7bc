"""torch.compile(fullgraph=True) as the very first softmax_ext call of a fresh process.

A user who compiles a training step before ever calling the loss eagerly must get one graph with
no break and torch's values and gradients. Each case runs in its own Python process (nothing warmed
by an earlier test), CPU and inductor; the processes run side by side to save time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# name -> (softmax_ext call, torch reference), as expressions of x (logits), t (index targets),
# p (class probabilities) and w (class weights).
CASES = {
    "cross_entropy_index": (
        "se.cross_entropy(x, t, weight=w, label_smoothing=0.1)",
        "F.cross_entropy(x, t, weight=w, label_smoothing=0.1)",
    ),
    "cross_entropy_index_none": (
        "se.cross_entropy(x, t, reduction='none').square().sum()",
        "F.cross_entropy(x, t, reduction='none').square().sum()",
    ),
    "cross_entropy_soft": (
        "se.cross_entropy(x, p, weight=w, reduction='sum')",
        "F.cross_entropy(x, p, weight=w, reduction='sum')",
    ),
    "CrossEntropyLoss": (
        "se.CrossEntropyLoss(ignore_index=2)(x, t)",
        "torch.nn.CrossEntropyLoss(ignore_index=2)(x, t)",
    ),
    "softmax": ("se.softmax(x, 1).square().sum()", "F.softmax(x, 1).square().sum()"),
    "log_softmax": ("se.log_softmax(x, 0).square().sum()", "F.log_softmax(x, 0).square().sum()"),
    "Softmax": ("se.Softmax(dim=1)(x)[:, 0].sum()", "torch.nn.Softmax(dim=1)(x)[:, 0].sum()"),
    "LogSoftmax": (
        "se.LogSoftmax(dim=1)(x).square().sum()",
        "torch.nn.LogSoftmax(dim=1)(x).square().sum()",
    ),
}

SCRIPT = """
import torch
import torch.nn.functional as F

import softmax_ext as se

torch.manual_seed(0)
x = torch.randn(9, 13, requires_grad=True)
t = torch.randint(0, 13, (9,))
p = torch.rand(9, 13).softmax(1)
w = torch.rand(13) + 0.5

def ours(x):
    return {ours}

compiled = torch.compile(ours, fullgraph=True)  # a graph break raises here
out = compiled(x)
(grad,) = torch.autograd.grad(out, x)
ref = {theirs}
(ref_grad,) = torch.autograd.grad(ref, x)
torch.testing.assert_close(out, ref)
torch.testing.assert_close(grad, ref_grad)
print("first-call compile ok")
"""


def _run(name: str) -> subprocess.CompletedProcess:
    ours, theirs = CASES[name]
    code = textwrap.dedent(SCRIPT).format(ours=ours, theirs=theirs)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def results() -> dict:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(_run, CASES), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_first_call_inside_torch_compile(name, results):
    proc = results[name]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "first-call compile ok" in proc.stdout

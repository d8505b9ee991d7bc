"""The C++ backend as users meet it: torch.library opcheck, torch.compile, the module as a drop-in,
memory kept for backward, long rows (several chunks) and multithreading."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import softmax_ext as se

OPS = torch.ops.softmax_ext


def _opcheck_cases():
    x = torch.randn(6, 11)
    t = torch.tensor([0, 3, -100, 10, 2, 2])
    w = torch.rand(11)
    loss, lse = OPS.ce_index_fwd(x, t, w, -100, 0.1, 1, 0.0, 0.0)
    g = torch.randn(6)
    p = torch.rand(6, 11).softmax(1)
    loss, lse_s, tsum = OPS.ce_soft_fwd(x, p, w, -100, 0.1, 1, 0.0, 0.0)
    y = OPS.softmax_fwd(x, 1, False)
    # the option block: ignore_index, label_smoothing, reduction (0 none, 1 mean, 2 sum)
    return [
        (OPS.softmax_fwd, (torch.randn(3, 5, 4), 1, False)),
        (OPS.softmax_fwd, (torch.randn(3, 5, 4), 2, True)),
        (OPS.softmax_bwd, (torch.randn(6, 11), y, 1, False)),
        (OPS.ce_index_fwd, (x, t, w, -100, 0.1, 1, 0.0, 0.0)),
        (OPS.ce_index_fwd, (x, t, None, -100, 0.0, 1, 0.0, 0.0)),
        (OPS.ce_index_bwd, (g, x, t, w, lse, None, -100, 0.1, 1, 0.0, 1.5)),
        (OPS.ce_soft_fwd, (x, p, None, -100, 0.0, 1, 0.0, 0.0)),
        (OPS.ce_soft_bwd, (g, x, p, w, lse_s, tsum, None, -100, 0.1, 1, 0.0, 0.0)),
        # the reduced losses and softmax with their C++ autograd nodes (inputs that need a
        # gradient make opcheck test the autograd registration too): mean with weights, none, sum
        # with smoothing; soft targets with gradients for the target and the weights too
        (OPS.cross_entropy_index, (x.clone().requires_grad_(), t, w, -100, 0.0, 1, 0.0, 0.0, 0)),
        (
            OPS.cross_entropy_index,
            (x.clone().requires_grad_(), t.clamp(min=0), None, 2, 0.0, 0, 0.0, 0.0, 0),
        ),
        (OPS.cross_entropy_index, (x.clone().requires_grad_(), t, w, -100, 0.2, 2, 0.5, 2.0, 0)),
        (
            OPS.cross_entropy_soft,
            (x.clone().requires_grad_(), p.clone().requires_grad_(), w, -100, 0.1, 1, 0.0, 0.0, 0),
        ),
        (
            OPS.cross_entropy_soft,
            (x.clone().requires_grad_(), p, w.clone().requires_grad_(), -100, 0.0, 0, 0.3, 3.0, 0),
        ),
        (OPS.softmax, (torch.randn(3, 5, 4, requires_grad=True), 1, False, 0)),
        (OPS.softmax, (torch.randn(3, 5, 4, requires_grad=True), 2, True, 0)),
    ]


@pytest.mark.parametrize("i", range(15))
def test_opcheck(i):
    op, args = _opcheck_cases()[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_without_graph_breaks():
    torch._dynamo.reset()
    x = torch.randn(8, 13, requires_grad=True)
    t = torch.randint(0, 13, (8,))
    w = torch.rand(13)

    def f(x):
        loss = se.cross_entropy(x, t, weight=w, label_smoothing=0.1)
        return loss + se.log_softmax(x, 1).mean() + se.softmax(x, 0).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    g_compiled = x.grad.clone()
    x.grad = None
    f(x).backward()
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(g_compiled, x.grad)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    model = torch.nn.Linear(20, 9)
    loss_fn = se.CrossEntropyLoss(label_smoothing=0.05)
    x, t = torch.randn(16, 20), torch.randint(0, 9, (16,))
    step = torch.compile(lambda x, t: loss_fn(model(x), t), fullgraph=True)
    loss = step(x, t)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(model(x), t, label_smoothing=0.05))


def test_module_is_a_drop_in():
    w = torch.rand(5)
    ours = se.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    assert "weight" in dict(ours.named_buffers())
    moved = copy.deepcopy(ours).to(torch.float64)
    assert moved.weight.dtype == torch.float64
    fresh = se.CrossEntropyLoss(weight=torch.zeros(5))
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh.weight, w)
    x, t = torch.randn(7, 5), torch.randint(0, 5, (7,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))


def test_training_loop_ends_with_same_parameters():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    data = [(torch.randn(32, 12), torch.randint(0, 4, (32,))) for _ in range(20)]
    results = []
    for loss_fn in (
        torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        se.CrossEntropyLoss(label_smoothing=0.1),
    ):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, t in data:
            opt.zero_grad()
            loss_fn(model(x), t).backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def _saved_bytes(fn) -> int:
    """Storage bytes autograd saves for backward that are not the logits themselves."""
    x = torch.randn(256, 4000, requires_grad=True)
    t = torch.randint(0, 4000, (256,))
    seen: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            st = tensor.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, t).backward()
    return sum(seen.values())


def test_memory_saved_for_backward_is_per_row():
    ours = _saved_bytes(lambda x, t: se.cross_entropy(x, t, label_smoothing=0.1))
    theirs = _saved_bytes(lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1))
    assert ours <= 64 * 256, f"saved {ours} bytes for 256 rows"  # O(rows): targets, lse, scalars
    assert theirs >= 4 * 256 * 4000  # PyTorch keeps the N x C log-probabilities


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_long_rows_span_several_chunks(dtype):
    # 5000 classes: three 2048-value chunks, the max in the last one, -inf spread across chunks.
    x = torch.randn(9, 5000, dtype=torch.float64)
    x[:, 4900] += 8
    x[0, :2100] = float("-inf")
    x = x.to(dtype)
    t = torch.tensor([4900, 1, 2500, 4999, 0, 2048, 2047, 3000, 17])
    t[1] = 2200
    w = (torch.rand(5000) + 0.1).to(dtype)
    for kw in (dict(), dict(weight=w, label_smoothing=0.2)):
        xa, xb = x.detach().clone().requires_grad_(), x.detach().double().requires_grad_()
        a = se.cross_entropy(xa, t, reduction="none", **kw)
        b = F.cross_entropy(
            xb,
            t,
            reduction="none",
            **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()},
        )
        a.sum().backward()
        b.sum().backward()
        tol = 1e-10 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 5e-2)
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
        torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=tol, atol=tol)
    y = se.softmax(x, 1)
    torch.testing.assert_close(
        y.double(), x.double().softmax(1), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6
    )


def test_results_do_not_depend_on_thread_count():
    x = torch.randn(4096, 300)
    t = torch.randint(0, 300, (4096,))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = se.cross_entropy(x, t, reduction="none")
        torch.set_num_threads(max(2, n))
        many = se.cross_entropy(x, t, reduction="none")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


def test_backend_errors():
    with pytest.raises(RuntimeError, match="CPU tensors only|cpp"):
        from softmax_ext.ops import backend_code

        backend_code("cpp", torch.device("cuda"))


def test_gradient_buffer_reuse_never_aliases_live_tensors():
    # 1024 x 4096 float32 = 16 MiB: above the reuse threshold.
    x = torch.randn(1024, 4096)
    t = torch.randint(0, 4096, (1024,))
    se.empty_cache()

    def grad():
        xa = x.clone().requires_grad_()
        se.cross_entropy(xa, t, reduction="sum").backward()
        return xa.grad

    first = grad()
    held = first.clone()
    second = grad()  # `first` is alive: must get a fresh buffer
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, held)  # untouched by the second backward
    ptrs = {first.data_ptr(), second.data_ptr()}
    del first, second
    third = grad()  # nothing holds the cached buffers any more: one is reused, values still right
    assert third.data_ptr() in ptrs
    torch.testing.assert_close(third, held)
    view = third[:10]
    other = grad()  # takes the other idle buffer
    del third
    fourth = grad()  # `other` is alive and a live view keeps third's storage busy: a fresh buffer
    assert fourth.data_ptr() not in {view.data_ptr(), other.data_ptr()}
    assert se.empty_cache() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_finite_half_converts_exactly(dtype):
    """The C++ half <-> float conversions, through log-softmax's backward with y = -inf, which
    returns grad_output unchanged: every finite bit pattern (subnormals included) round-trips."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    g = bits.view(dtype)
    g = g[g.isfinite()].reshape(-1, 1)
    out = OPS.softmax_bwd(g, torch.full_like(g, float("-inf")), 1, True)
    assert torch.equal(out.view(torch.int16)[g != 0], g.view(torch.int16)[g != 0])
    assert bool((out[g == 0] == 0).all())

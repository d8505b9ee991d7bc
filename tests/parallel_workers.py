"""What each rank runs in tests/test_parallel.py: real gloo process groups on loopback.

:func:`launch` spawns ``world`` processes (torch.multiprocessing, spawn), each joins a gloo group
on 127.0.0.1 and runs every suite named, writing a list of failure messages per suite to a pickle;
the parent waits with a deadline (a hang fails the test, and the processes are killed). A suite
compares values and gradients with float64 references built from torch ops on the gathered
(whole-vocabulary) logits, so a rank's result is checked against what one device computes.
"""

from __future__ import annotations

import faulthandler
import itertools
import math
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---- the parent side -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    world: int, sizes: Sequence[int], suites: Sequence[str], backend: str, timeout_s: float = 240
) -> Dict[str, List[List[str]]]:
    """Run ``suites`` on ``world`` gloo ranks whose class slices have ``sizes``; return, per suite,
    each rank's failure messages (empty lists: it passed). Raises if a rank crashed or the whole
    run took longer than ``timeout_s`` (the ranks are then terminated)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        ctx = mp.start_processes(
            _entry,
            args=(world, port, tuple(sizes), tuple(suites), backend, tmp),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world} ranks did not finish within {timeout_s} s")
        except mp.ProcessExitedException as e:
            done = [r for r in range(world) if Path(tmp, f"rank{r}.pkl").exists()]
            raise RuntimeError(
                f"rank {e.error_index} of {world} died (exit code {e.exit_code}, signal "
                f"{getattr(e, 'signal_name', None)}); ranks {done} had written their results "
                "(a dead rank's Python traceback, from faulthandler, is in the captured stderr)"
            ) from e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        out: Dict[str, List[List[str]]] = {s: [] for s in suites}
        for r in range(world):
            got = pickle.loads(Path(tmp, f"rank{r}.pkl").read_bytes())
            for s in suites:
                out[s].append(got[s])
        return out


def _entry(rank, world, port, sizes, suites, backend, folder) -> None:
    # a rank that dies on a signal (SIGABRT from a C++ std::terminate, SIGSEGV) prints every
    # thread's Python stack first: the parent only learns the signal
    faulthandler.enable(all_threads=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    results = {}
    try:
        for name in suites:
            failures: List[str] = []
            try:
                suite = SUITES.get(name) or globals()[f"suite_{name}"]
                suite(Ctx(rank, world, list(sizes), backend, failures))
            except Exception:  # noqa: BLE001 - reported to the parent as a failure of the suite
                failures.append(traceback.format_exc())
            results[name] = failures
            dist.barrier()
    finally:
        Path(folder, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
        dist.destroy_process_group()
    # Leave without the interpreter's finalisation: the results are on disk and the group is
    # gone. Finalisation with gloo's threads still about can abort (pytorch/pytorch#179291), and
    # CI once saw a rank of torch 2.11 die of SIGABRT ("terminate called without an active
    # exception") at a point its log does not show; faulthandler above now shows where.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- the rank side -------------------------------------------------------------------------------


class Ctx:
    """One rank's view: its class slice, the backend under test and the failures found."""

    def __init__(self, rank: int, world: int, sizes: List[int], backend: str, failures: List[str]):
        self.rank, self.world, self.sizes, self.backend = rank, world, sizes, backend
        self.failures = failures
        self.V = sum(sizes)
        self.lo = sum(sizes[:rank])
        self.hi = self.lo + sizes[rank]

    def local(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full tensor along ``dim`` (a view: strided, not contiguous)."""
        return full.narrow(dim, self.lo, self.hi - self.lo)

    def close(self, what: str, got, want, atol: float, rtol: float = 0.0) -> None:
        got, want = torch.as_tensor(got), torch.as_tensor(want)
        if got.shape != want.shape:
            self.failures.append(f"{what}: shape {list(got.shape)} != {list(want.shape)}")
            return
        if got.dtype != want.dtype:
            self.failures.append(f"{what}: dtype {got.dtype} != {want.dtype}")
            return
        g, w = got.double(), want.double()
        same_nonfinite = torch.equal(torch.isfinite(g), torch.isfinite(w)) and torch.equal(
            g[~torch.isfinite(g)].nan_to_num(), w[~torch.isfinite(w)].nan_to_num()
        )
        fin = torch.isfinite(w)
        ok = same_nonfinite and torch.allclose(g[fin], w[fin], atol=atol, rtol=rtol)
        if not ok:
            err = (g[fin] - w[fin]).abs().max().item() if fin.any() else float("nan")
            self.failures.append(
                f"{what}: max error {err:.3g} (atol {atol}); nonfinite ok: {same_nonfinite}"
            )

    def expect_error(self, what: str, fn: Callable[[], object], kind: type, text: str) -> str:
        try:
            fn()
        except kind as e:
            if text not in str(e):
                self.failures.append(f"{what}: message {str(e)!r} lacks {text!r}")
            return f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{what}: raised {type(e).__name__}: {e}, not {kind.__name__}")
            return f"{type(e).__name__}: {e}"
        self.failures.append(f"{what}: no exception")
        return ""


def reference(
    x,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    return_z_loss=False,
    return_lse=False,
):
    """cross_entropy with the language-model options from torch ops, on the whole logits."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(
        x,
        target,
        weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if not (lse_square_scale or return_z_loss or return_lse):
        return loss
    lse = x.logsumexp(1 if x.dim() > 1 else 0)
    counted = (
        torch.ones_like(lse, dtype=torch.bool)
        if target.is_floating_point()
        else target != ignore_index
    )
    z_rows = torch.where(counted, lse_square_scale * lse.square(), torch.zeros_like(lse))
    z = {"none": z_rows, "sum": z_rows.sum()}.get(reduction)
    if z is None:
        z = z_rows.sum() / counted.sum()
    out = (loss + z,)
    if return_z_loss:
        out += (z,)
    if return_lse:
        out += (lse,)
    return out if len(out) > 1 else out[0]


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _probe_sum(outs, seed=11):
    """A random combination of every output, so each output's gradient is checked."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for o in outs:
        total = total + (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    return total


def _data(shape, V, kind, seed, dtype=torch.float64, scale=3.0):
    """Full logits of ``shape`` (class dim 1, or 0 for a (C,) input) and targets, the same on every
    rank (seeded): class indices with an ignored one, or class probabilities."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    cdim = 1 if len(shape) > 1 else 0
    row_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if kind == "index":
        t = torch.randint(0, V, row_shape, generator=gen)
        if t.dim() and t.numel() > 2:
            t.view(-1)[2] = -100
        return x, t
    q = torch.randn(shape, generator=gen, dtype=torch.float64).softmax(cdim).to(dtype)
    return x, q


LAYOUTS = {"NC": lambda V: (7, V), "C": lambda V: (V,), "NCd": lambda V: (3, V, 2, 2)}

OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.3},
    {"label_smoothing": 1.0, "reduction": "sum"},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.2},
    {"weight": True, "label_smoothing": 0.2, "reduction": "none"},
    {"ignore_index": 3, "weight": True, "reduction": "sum"},
    {"softcap": 2.0},
    {"softcap": 1.5, "label_smoothing": 0.1, "weight": True, "reduction": "none"},
    {"lse_square_scale": 1e-2, "return_z_loss": True, "return_lse": True},
    {
        "lse_square_scale": 1e-2,
        "return_z_loss": True,
        "return_lse": True,
        "label_smoothing": 0.4,
        "weight": True,
        "softcap": 3.0,
    },
    {"return_lse": True, "reduction": "none", "label_smoothing": 0.5},
]


def _call_case(
    c: Ctx,
    layout: str,
    kind: str,
    kw: dict,
    seed: int,
    dtype=torch.float64,
    contiguous: bool = False,
    target_grad: bool = False,
    hostile: bool = False,
):
    """One option set: the process-group loss on this rank's slice against the reference on the
    whole logits, every output and the gradient of this rank's slice (and of the soft target)."""
    import softmax_ext as se

    shape = LAYOUTS[layout](c.V)
    cdim = 1 if len(shape) > 1 else 0
    x, t = _data(shape, c.V, kind, seed, dtype)
    if hostile:
        rows = x.movedim(cdim, -1).reshape(-1, c.V)  # a copy for K-dim, a view otherwise
        rows[0] = 1e4  # all-equal row at a large value
        rows[1, ::2] = -1e4
        if kind == "index" and not kw.get("label_smoothing") and "softcap" not in kw:
            rows[min(3, rows.shape[0] - 1), 1::3] = -math.inf
        x = rows.reshape(x.movedim(cdim, -1).shape).movedim(-1, cdim).contiguous()
        if kind == "index" and x.dim() > 1:  # no -inf at a counted target (an infinite loss)
            flat_t = t.reshape(-1)
            xr = x.movedim(cdim, -1).reshape(-1, c.V)
            for r in range(flat_t.numel()):
                if flat_t[r] >= 0 and torch.isinf(xr[r, flat_t[r]]):
                    flat_t[r] = -100
            t = flat_t.reshape(t.shape)
    kw = dict(kw)
    if kw.get("weight") is True:
        kw["weight"] = (
            torch.rand(c.V, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            + 0.5
        ).to(dtype)
    if kind == "soft" and "ignore_index" in kw:
        kw.pop("ignore_index")
    if kind == "index" and "ignore_index" in kw:
        t = torch.where(t == -100, kw["ignore_index"], t)
    if layout == "C" and kind == "index":
        t = t.reshape(())  # one row
        if int(t) == -100:
            t = torch.tensor(1)
    xl = c.local(x, cdim).detach()
    if contiguous:
        xl = xl.contiguous()
    xl.requires_grad_()
    xf = x.detach().clone().requires_grad_()
    tl = c.local(t, cdim).detach() if kind == "soft" else t
    tf = t
    if target_grad:
        tl = tl.clone().requires_grad_()
        tf = t.clone().requires_grad_()
    what = f"rank {c.rank} {layout} {kind} {dtype} {kw.get('weight') is not None and 'w'} " + str(
        {k: v for k, v in kw.items() if k != "weight"}
    )
    try:
        got = _tuple(
            se.cross_entropy(xl, tl, process_group=dist.group.WORLD, backend=c.backend, **kw)
        )
    except Exception as e:  # noqa: BLE001
        c.failures.append(f"{what}: raised {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return
    want = _tuple(reference(xf, tf, **kw))
    if len(got) != len(want):
        c.failures.append(f"{what}: {len(got)} outputs, want {len(want)}")
        return
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        c.close(f"{what} output {i}", a, b.detach().to(a.dtype), atol=tol, rtol=tol)
    if not got[0].requires_grad:
        c.failures.append(f"{what}: the loss does not require grad")
        return
    gl = torch.autograd.grad(_probe_sum(got), [xl] + ([tl] if target_grad else []))
    gf = torch.autograd.grad(_probe_sum(want), [xf] + ([tf] if target_grad else []))
    c.close(f"{what} grad input", gl[0], c.local(gf[0], cdim), atol=tol, rtol=tol)
    if target_grad:
        c.close(f"{what} grad target", gl[1], c.local(gf[1], cdim), atol=tol, rtol=tol)


def suite_options(c: Ctx) -> None:
    """Every option set of OPTIONS, both target kinds, the three layouts, float64."""
    seed = 0
    for layout, kind, kw in itertools.product(LAYOUTS, ("index", "soft"), OPTIONS):
        seed += 1
        if kind == "soft" and kw.get("ignore_index") is not None:
            continue
        _call_case(c, layout, kind, kw, seed, contiguous=seed % 2 == 0)


def suite_hostile(c: Ctx) -> None:
    """Rows at +-1e4, all-equal rows, -inf logits; float64 and float32; soft-target gradients."""
    for i, (kind, kw) in enumerate(itertools.product(("index", "soft"), OPTIONS[:12:2])):
        _call_case(c, "NC", kind, kw, 100 + i, hostile=True)
    for i, kw in enumerate(OPTIONS[::3]):
        for kind in ("index", "soft"):
            _call_case(c, "NC", kind, kw, 200 + i, dtype=torch.float32)
    _call_case(c, "NC", "soft", {"label_smoothing": 0.2, "weight": True}, 300, target_grad=True)
    _call_case(c, "NCd", "soft", {"softcap": 2.0}, 301, target_grad=True)


class _Counts:
    def __init__(self):
        self.calls: Dict[str, int] = {}

    def wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted


def suite_collectives(c: Ctx) -> None:
    """Forward: one all-gather and two all-reduces; backward: none (cross_entropy), one all-reduce
    (linear_cross_entropy: the input gradient); no object collectives when nothing fails."""
    import softmax_ext as se

    names = (
        "all_reduce",
        "all_gather",
        "all_gather_object",
        "broadcast",
        "all_gather_into_tensor",
        "reduce_scatter",
        "all_to_all",
        "barrier",
        "gather",
        "scatter",
    )
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    x, t = _data((16, c.V), c.V, "index", 7)
    w = torch.randn(c.V, 5, dtype=torch.float64)
    h = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    for label, run in [
        (
            "cross_entropy index",
            lambda: se.cross_entropy(
                c.local(x, 1).detach().requires_grad_(),
                t,
                process_group=dist.group.WORLD,
                label_smoothing=0.1,
                return_lse=True,
                backend=c.backend,
            ),
        ),
        (
            "cross_entropy soft",
            lambda: se.cross_entropy(
                c.local(x, 1).detach().requires_grad_(),
                c.local(x.softmax(1), 1),
                process_group=dist.group.WORLD,
                backend=c.backend,
            ),
        ),
        (
            "linear_cross_entropy",
            lambda: se.linear_cross_entropy(
                h,
                c.local(w, 0).detach().requires_grad_(),
                t,
                process_group=dist.group.WORLD,
                backend=c.backend,
            ),
        ),
    ]:
        counts = _Counts()
        try:
            for n, fn in saved.items():
                setattr(dist, n, counts.wrap(n, fn))
            out = _tuple(run())
            fwd = dict(counts.calls)
            counts.calls.clear()
            _probe_sum(out).backward()
            bwd = dict(counts.calls)
        finally:
            for n, fn in saved.items():
                setattr(dist, n, fn)
        if fwd != {"all_gather": 1, "all_reduce": 2}:
            c.failures.append(f"{label}: forward collectives {fwd}")
        want_bwd = {"all_reduce": 1} if label.startswith("linear") else {}
        if bwd != want_bwd:
            c.failures.append(f"{label}: backward collectives {bwd}, want {want_bwd}")


def suite_errors(c: Ctx) -> None:
    """A bad argument on one rank raises the same error on every rank (nothing hangs), and the
    group is still usable afterwards."""
    import softmax_ext as se

    pg = dist.group.WORLD
    x, t = _data((6, c.V), c.V, "index", 3)
    xl = c.local(x, 1)
    msgs = []
    rows = 6 if c.rank else 5  # rank 0 holds fewer rows
    msgs.append(
        c.expect_error(
            "rows differ",
            lambda: se.cross_entropy(
                c.local(x[:rows], 1), t[:rows], process_group=pg, backend=c.backend
            ),
            ValueError,
            "every rank must hold the same rows",
        )
    )
    bad = t.clone()
    bad[1] = c.V  # out of the whole vocabulary on every rank (in range of none)
    msgs.append(
        c.expect_error(
            "target out of bounds",
            lambda: se.cross_entropy(xl, bad, process_group=pg, backend=c.backend),
            IndexError,
            f"Target {c.V} is out of bounds",
        )
    )
    msgs.append(
        c.expect_error(
            "targets differ",
            lambda: se.cross_entropy(
                xl, (t + c.rank).clamp(max=c.V - 1), process_group=pg, backend=c.backend
            ),
            ValueError,
            "targets differ across ranks",
        )
    )
    last = c.world - 1  # only the last rank passes a bad label_smoothing: every rank raises
    msgs.append(
        c.expect_error(
            "smoothing on one rank",
            lambda: se.cross_entropy(
                xl,
                t,
                process_group=pg,
                backend=c.backend,
                label_smoothing=1.5 if c.rank == last else 0.0,
            ),
            RuntimeError,
            f"rank {last} of {c.world}] label_smoothing must be between 0.0 and 1.0",
        )
    )
    msgs.append(
        c.expect_error(
            "weight length",
            lambda: se.cross_entropy(
                xl,
                t,
                torch.ones(c.hi - c.lo, dtype=torch.float64),
                process_group=pg,
                backend=c.backend,
            ),
            RuntimeError,
            "weight tensor should be defined",
        )
    )
    msgs.append(
        c.expect_error(
            "dtype differs",
            lambda: se.cross_entropy(
                xl.float() if c.rank == 0 else xl, t, process_group=pg, backend=c.backend
            ),
            ValueError,
            "different dtypes",
        )
    )
    msgs.append(
        c.expect_error(
            "target kind differs",
            lambda: se.cross_entropy(
                xl,
                c.local(x.softmax(1), 1) if c.rank == 0 else t,
                process_group=pg,
                backend=c.backend,
            ),
            ValueError,
            "kind of target",
        )
    )
    msgs.append(
        c.expect_error(
            "linear hidden differs",
            lambda: se.linear_cross_entropy(
                torch.randn(6, 4 + c.rank, dtype=torch.float64),
                torch.randn(c.hi - c.lo, 4 + c.rank, dtype=torch.float64),
                t,
                process_group=pg,
                backend=c.backend,
            ),
            ValueError,
            "",
        )
    )
    # the same message on every rank
    gathered: List[Optional[list]] = [None] * c.world
    dist.all_gather_object(gathered, msgs)
    if any(g != gathered[0] for g in gathered):
        c.failures.append(f"the ranks raised different errors: {gathered}")
    # still in step: a valid call after the failed ones
    got = se.cross_entropy(xl, t, process_group=pg, backend=c.backend)
    c.close("valid call after errors", got, reference(x, t), atol=1e-10)


def suite_dtensor(c: Ctx) -> None:
    """DTensor logits sharded on the class dim: torch's loss_parallel where it has the option
    (values and the local gradient), the reference on the whole logits for the others."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    import softmax_ext as se

    mesh = init_device_mesh("cpu", (c.world,))
    V = 8 * c.world - 1  # uneven: DTensor's chunks of ceil(V / world)
    chunk = -(-V // c.world)
    lo, hi = min(V, c.rank * chunk), min(V, (c.rank + 1) * chunk)
    for i, (kw, kind) in enumerate(
        itertools.product(
            [
                {},
                {"reduction": "sum"},
                {"reduction": "none"},
                {"weight": True},
                {"ignore_index": 2, "weight": True, "reduction": "none"},
            ],
            ("index", "soft"),
        )
    ):
        x, t = _data((6, V), V, kind, 40 + i)
        if kind == "soft" and "ignore_index" in kw:
            continue
        if kind == "index" and "weight" in kw:
            # torch's loss_parallel backward fails on an ignored row when weighted (it gathers
            # the weight at -100), so the weighted cases ignore only with ignore_index=2 below
            t = torch.where(t == -100, kw.get("ignore_index", 0), t)
        kw = dict(kw)
        if kw.get("weight") is True:
            kw["weight"] = torch.rand(V, dtype=torch.float64) + 0.5
            dist.broadcast(kw["weight"], 0)
        what = f"dtensor {kind} {sorted(kw)}"

        def dt(x=x):
            return DTensor.from_local(
                x[:, lo:hi].clone(), mesh, [Shard(1)], run_check=False, shape=x.shape, stride=(V, 1)
            ).requires_grad_()

        ours_in, theirs_in = dt(), dt()
        tgt_ours = (
            DTensor.from_local(
                t[:, lo:hi].clone(), mesh, [Shard(1)], run_check=False, shape=t.shape, stride=(V, 1)
            )
            if kind == "soft"
            else t
        )
        ours = se.cross_entropy(ours_in, tgt_ours, **kw)
        if not isinstance(ours, DTensor) or tuple(ours.placements) != (Replicate(),):
            c.failures.append(
                f"{what}: got {type(ours).__name__} "
                f"{getattr(ours, 'placements', None)}, want Replicate DTensor"
            )
            continue
        (ours.sum() if ours.dim() else ours).backward()
        if kind == "index":  # loss_parallel takes class indices only
            with loss_parallel():
                theirs = F.cross_entropy(theirs_in, t, **kw)
                (theirs.sum() if theirs.dim() else theirs).backward()
            want_value, want_grad = theirs.to_local(), theirs_in.grad.to_local()
        else:
            xf = x.clone().requires_grad_()
            want_value = reference(xf, t, **kw)
            (want_value.sum() if want_value.dim() else want_value).backward()
            want_grad = xf.grad[:, lo:hi]
        c.close(f"{what} value", ours.to_local(), want_value.detach(), atol=1e-10)
        c.close(f"{what} grad", ours_in.grad.to_local(), want_grad, atol=1e-10)
    # options loss_parallel lacks: against the reference on the whole logits
    x, t = _data((6, V), V, "index", 60)
    xin = DTensor.from_local(
        x[:, lo:hi].clone(), mesh, [Shard(1)], run_check=False, shape=x.shape, stride=(V, 1)
    ).requires_grad_()
    kw = {"label_smoothing": 0.3, "softcap": 2.0, "lse_square_scale": 1e-2, "return_lse": True}
    ours = se.cross_entropy(xin, t, **kw)
    want = reference(x, t, **kw)
    for i, (a, b) in enumerate(zip(ours, want, strict=True)):
        c.close(f"dtensor smoothing/softcap/z-loss output {i}", a.to_local(), b, atol=1e-10)
    bad = DTensor.from_local(x.clone(), mesh, [Replicate()], run_check=False)
    c.expect_error(
        "replicated dtensor",
        lambda: se.cross_entropy(bad, t),
        ValueError,
        "must be sharded on its class dim",
    )


def suite_linear(c: Ctx) -> None:
    """linear_cross_entropy with the projection's rows (and bias) sharded by vocabulary: the loss,
    the full input gradient and this rank's weight and bias gradients."""
    import softmax_ext as se

    H = 6
    for i, (kind, kw, bias, chunk) in enumerate(
        itertools.product(
            ("index", "soft"),
            [
                {},
                {"reduction": "sum", "label_smoothing": 0.2, "weight": True},
                {"reduction": "none", "softcap": 2.0},
                {"lse_square_scale": 1e-2, "return_lse": True, "return_z_loss": True},
            ],
            (False, True),
            (None, 3),
        )
    ):
        gen = torch.Generator().manual_seed(70 + i)
        x = torch.randn(2, 5, H, generator=gen, dtype=torch.float64)
        W = torch.randn(c.V, H, generator=gen, dtype=torch.float64)
        b = torch.randn(c.V, generator=gen, dtype=torch.float64) if bias else None
        if kind == "index":
            t = torch.randint(0, c.V, (2, 5), generator=gen)
            t[0, 1] = -100
        else:
            t = torch.randn(2, 5, c.V, generator=gen, dtype=torch.float64).softmax(-1)
        kw = dict(kw)
        if kw.get("weight") is True:
            kw["weight"] = torch.rand(c.V, generator=gen, dtype=torch.float64) + 0.5
        xs, Ws = x.clone().requires_grad_(), c.local(W, 0).detach().clone().requires_grad_()
        bs = c.local(b, 0).detach().clone().requires_grad_() if bias else None
        xf, Wf = x.clone().requires_grad_(), W.clone().requires_grad_()
        bf = b.clone().requires_grad_() if bias else None
        tl = c.local(t, 2) if kind == "soft" else t
        got = _tuple(
            se.linear_cross_entropy(
                xs,
                Ws,
                tl,
                linear_bias=bs,
                chunk_size=chunk,
                process_group=dist.group.WORLD,
                backend=c.backend,
                **kw,
            )
        )
        logits = F.linear(xf, Wf, bf)
        want = _tuple(
            reference(
                logits.reshape(-1, c.V),
                t.reshape(-1, c.V) if kind == "soft" else t.reshape(-1),
                **kw,
            )
        )
        want = tuple(w.reshape(x.shape[:-1]) if w.dim() else w for w in want)
        what = f"linear {kind} bias={bias} chunk={chunk} {sorted(kw)}"
        for j, (a, w) in enumerate(zip(got, want, strict=True)):
            c.close(f"{what} output {j}", a, w, atol=1e-10)
        params = [xs, Ws] + ([bs] if bias else [])
        gl = torch.autograd.grad(_probe_sum(got), params)
        gf = torch.autograd.grad(_probe_sum(want), [xf, Wf] + ([bf] if bias else []))
        c.close(f"{what} grad input", gl[0], gf[0], atol=1e-10)
        c.close(f"{what} grad weight", gl[1], c.local(gf[1], 0), atol=1e-10)
        if bias:
            c.close(f"{what} grad bias", gl[2], c.local(gf[2], 0), atol=1e-10)


def suite_sleep(c: Ctx) -> None:
    """A rank that never finishes (for the launcher's deadline test; not in SUITES)."""
    time.sleep(3600)


def suite_abort(c: Ctx) -> None:
    """The last rank dies of SIGABRT (for the launcher's crash report test; not in SUITES)."""
    if c.rank == c.world - 1:
        os.abort()


SUITES: Dict[str, Callable[[Ctx], None]] = {
    "options": suite_options,
    "hostile": suite_hostile,
    "collectives": suite_collectives,
    "errors": suite_errors,
    "dtensor": suite_dtensor,
    "linear": suite_linear,
}

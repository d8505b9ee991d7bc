"""The vocabulary-parallel suite: ``python -m benchmarks --suite parallel``.

One training step (the loss and the gradient of this rank's logits, which require grad) of a
cross-entropy whose classes are split across ``world`` (2) gloo processes on this machine
(``torch.multiprocessing`` spawn, loopback, a free port), each holding a contiguous half of the
logits' columns; fp32, class-index targets, ``reduction="mean"``:

* softmax_ext: ``softmax_ext.cross_entropy(local, target, process_group=WORLD)``;
* loss_parallel: torch's DTensor path, ``DTensor.from_local(local, mesh, [Shard(1)])`` and
  ``F.cross_entropy`` inside ``torch.distributed.tensor.parallel.loss_parallel()`` (the backward
  too, as its documentation asks);
* softmax_ext (1 process): the unsharded cost, ``softmax_ext.cross_entropy`` on the full logits
  in the parent process (after the workers have exited, with the parent's threads).

Timing: after ``warmup`` untimed steps of each, ``reps`` interleaved rounds (the order rotating
each round, as :func:`benchmarks.timing.interleaved`), each step preceded by a barrier; every rank
times its own steps with ``time.perf_counter``. Reported: rank 0's median, min and max, and the
median over rounds of the slowest rank's time.

Communication: one more untimed step of each, with every collective counted on each rank (rank
0's counts are reported; the ranks' are equal). softmax_ext: ``torch.distributed.all_reduce``,
``all_gather``, ``all_gather_object`` (and the other collectives) are monkeypatched; loss_parallel:
``torch.distributed.tensor.debug.CommDebugMode`` counts the collectives, and a
``TorchDispatchMode`` sums the bytes of the c10d functional collectives' input tensors (the same
mode also counts softmax_ext's c10d ops, a cross-check of the monkeypatch). Bytes are payloads:
the sizes of the tensors each rank hands to the collectives (for an all-gather, its own
contribution), not the traffic on the wire (a ring all-reduce sends about 2 (w-1)/w of its
payload per rank).
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .timing import CpuTimer, Step, interleaved, summarize

#: (rows N, classes V) of the issue's cases; fp32.
CASES: Tuple[Tuple[int, int], ...] = ((4096, 32000), (4096, 128256))
QUICK_CASES: Tuple[Tuple[int, int], ...] = ((1024, 8000),)
WORLD = 2
IMPLS = ("softmax_ext", "loss_parallel")
REFERENCE = "softmax_ext (1 process)"
JSON_NAME, MD_NAME = "parallel.json", "parallel.md"
BLOCK_ROWS = 256  # rows of the full logits generated at a time (a shard never needs them all)
BYTES_METHOD = {
    "softmax_ext": "torch.distributed collectives monkeypatched on each rank: numel * "
    "element_size of each call's input tensor (all_gather: this rank's tensor; "
    "all_gather_object: its pickle)",
    "loss_parallel": "TorchDispatchMode under loss_parallel: numel * element_size of the input "
    "tensor of each c10d functional collective DTensor issues (exact payload sizes); call counts "
    "from CommDebugMode",
}


def shard_bounds(classes: int, world: int) -> List[int]:
    """Rank r holds classes [b[r], b[r+1]): even contiguous slices, as DTensor's Shard(1)."""
    size = -(-classes // world)  # torch.chunk's sizes, which Shard(1) follows
    return [min(classes, r * size) for r in range(world + 1)]


def make_logits(rows: int, classes: int, lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    """Columns [lo, hi) of seeded (rows, classes) fp32 logits, generated ``BLOCK_ROWS`` full rows
    at a time: every rank's slice is a slice of the same full tensor, without holding it."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, hi - lo)
    for r in range(0, rows, BLOCK_ROWS):
        block = torch.randn(min(BLOCK_ROWS, rows - r), classes, generator=gen)
        out[r : r + block.shape[0]] = block[:, lo:hi]
    return out


def make_target(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Seeded int64 class indices, the same on every rank."""
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed + 1))


# ---- counting the collectives --------------------------------------------------------------------

_PATCHED = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


class CommCounter:
    """Collective calls and payload bytes, per phase ("fwd" / "bwd")."""

    def __init__(self) -> None:
        self.phase = "fwd"
        self.calls: Dict[str, Counter] = {"fwd": Counter(), "bwd": Counter()}
        self.bytes: Dict[str, int] = {"fwd": 0, "bwd": 0}

    def add(self, name: str, nbytes: int) -> None:
        self.calls[self.phase][name] += 1
        self.bytes[self.phase] += int(nbytes)

    def summary(self, rows: int) -> dict:
        return {
            "collectives": {p: dict(c) for p, c in self.calls.items()},
            "collective_calls": {p: sum(c.values()) for p, c in self.calls.items()},
            "bytes": dict(self.bytes),
            "bytes_per_row": sum(self.bytes.values()) / rows,
        }


@contextmanager
def patched_collectives(counter: CommCounter):
    """Count every ``torch.distributed.<collective>`` call (softmax_ext calls them by attribute
    on the module, so patching the module's attributes sees each call)."""
    import torch.distributed as dist

    saved = {}

    def wrap(name: str, fn: Callable):
        def counted(*args, **kwargs):
            if name == "all_gather_object":
                obj = args[1] if len(args) > 1 else kwargs.get("obj")
                counter.add(name, len(pickle.dumps(obj)))
            elif name in ("all_gather", "reduce_scatter", "all_to_all"):
                # (output list, input): this rank's contribution
                inp = args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input"))
                counter.add(name, _tensor_bytes(inp))
            elif name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
                inp = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
                counter.add(name, _tensor_bytes(inp))
            else:
                counter.add(name, _tensor_bytes(args[0] if args else kwargs.get("tensor")))
            return fn(*args, **kwargs)

        return counted

    for name in _PATCHED:
        if hasattr(dist, name):
            saved[name] = getattr(dist, name)
            setattr(dist, name, wrap(name, saved[name]))
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _dispatch_counter_mode(counter: CommCounter):
    """A TorchDispatchMode adding each c10d / c10d functional collective op (below DTensor: ops
    on DTensors are handed back to DTensor, whose desugared ops come back here) to ``counter``,
    with the bytes of its input tensors."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    skip = ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier")

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(t, type) and issubclass(t, DTensor) for t in types):
                return NotImplemented
            out = func(*args, **(kwargs or {}))
            ns = getattr(func, "namespace", "")
            if "c10d" in ns:
                name = func._overloadpacket.__name__
                if not any(s in name for s in skip):
                    # c10d ops that gather / scatter take (outputs, inputs, ...); the others and
                    # the functional collectives take the input first
                    outputs_first = ns == "c10d" and any(
                        s in name for s in ("gather", "scatter", "alltoall")
                    )
                    inp = args[1] if outputs_first and len(args) > 1 else args[0]
                    counter.add(f"{ns}.{name}", _tensor_bytes(inp))
            return out

    return Mode()


# ---- the workers ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Case:
    """One rank's inputs and steps of one (rows, classes) case."""

    def __init__(self, rows: int, classes: int, mesh, seed: int) -> None:
        import torch.distributed as dist

        self.rows, self.classes, self.mesh = rows, classes, mesh
        rank, world = dist.get_rank(), dist.get_world_size()
        b = shard_bounds(classes, world)
        self.lo, self.hi = b[rank], b[rank + 1]
        self.local = make_logits(rows, classes, self.lo, self.hi, seed).requires_grad_()
        self.target = make_target(rows, classes, seed)
        self.group = dist.group.WORLD

    def softmax_ext(self, counter: Optional[CommCounter] = None):
        import softmax_ext as se

        loss = se.cross_entropy(self.local, self.target, process_group=self.group)
        if counter is not None:
            counter.phase = "bwd"
        (grad,) = torch.autograd.grad(loss, self.local)
        return loss.detach(), grad

    def loss_parallel(self, counter: Optional[CommCounter] = None, debug: Optional[list] = None):
        import torch.nn.functional as F
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.parallel import loss_parallel

        shape, stride = torch.Size((self.rows, self.classes)), (self.classes, 1)
        with loss_parallel():
            with _maybe_comm_debug(debug):
                dt = DTensor.from_local(
                    self.local, self.mesh, [Shard(1)], run_check=False, shape=shape, stride=stride
                )
                loss = F.cross_entropy(dt, self.target)
            if counter is not None:
                counter.phase = "bwd"
            with _maybe_comm_debug(debug):
                (grad,) = torch.autograd.grad(loss, self.local)
        return loss.to_local().detach(), grad


@contextmanager
def _maybe_comm_debug(debug: Optional[list]):
    """CommDebugMode around the block when ``debug`` is a list (its counts are appended)."""
    if debug is None:
        yield
        return
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        yield
    debug.append({str(k): v for k, v in mode.get_comm_counts().items()})


def _count(case: _Case, impl: str) -> dict:
    """The collectives of one step of ``impl`` on this rank (an untimed step)."""
    rec: dict = {}
    if impl == "softmax_ext":
        patched, dispatched = CommCounter(), CommCounter()
        with patched_collectives(patched), _dispatch_counter_mode(dispatched):
            case.softmax_ext(_Both(patched, dispatched))
        rec.update(patched.summary(case.rows))
        rec["dispatch_check"] = dispatched.summary(case.rows)
    else:
        dispatched, debug = CommCounter(), []
        with _dispatch_counter_mode(dispatched):
            case.loss_parallel(dispatched, debug)
        rec.update(dispatched.summary(case.rows))
        fwd, bwd = debug
        rec["comm_debug_mode"] = {"fwd": fwd, "bwd": bwd}
        rec["collectives"] = {"fwd": fwd, "bwd": bwd}  # CommDebugMode's names and counts
        rec["collective_calls"] = {"fwd": sum(fwd.values()), "bwd": sum(bwd.values())}
    rec["bytes_method"] = BYTES_METHOD[impl]
    return rec


class _Both:
    """Sets the phase of two counters at once."""

    def __init__(self, *counters: CommCounter) -> None:
        self.counters = counters

    def __setattr__(self, name, value):
        if name == "phase":
            for c in self.counters:
                c.phase = value
        else:
            object.__setattr__(self, name, value)


def _run_case(case: _Case, reps: int, warmup: int) -> dict:
    """Warm-up, interleaved timed rounds (a barrier before each step), counting, checks."""
    import torch.distributed as dist

    steps = {"softmax_ext": case.softmax_ext, "loss_parallel": case.loss_parallel}
    outs = {}
    for name in IMPLS:
        for _ in range(warmup):
            dist.barrier()
            outs[name] = steps[name]()
    loss_ext, grad_ext = outs["softmax_ext"]
    loss_tp, grad_tp = outs["loss_parallel"]
    check = {
        "loss": {"softmax_ext": float(loss_ext), "loss_parallel": float(loss_tp)},
        "grad_max_abs_diff": float((grad_ext - grad_tp).abs().max()) if grad_ext.numel() else 0.0,
    }
    del outs, grad_ext, grad_tp
    names = list(IMPLS)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            dist.barrier()
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    dist.barrier()
    comms = {name: _count(case, name) for name in IMPLS}
    return {"times": times, "comms": comms, "check": check}


def _worker(
    rank: int,
    world: int,
    port: int,
    cases: Sequence[Tuple[int, int]],
    reps: int,
    warmup: int,
    threads: int,
    seed: int,
    out_path: str,
) -> None:
    """One rank: every case in turn; rank 0 writes the gathered results to ``out_path``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints its Python stacks
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = []
        for rows, classes in cases:
            case = _Case(rows, classes, mesh, seed)
            res = _run_case(case, reps, warmup)
            per_rank: List[Optional[dict]] = [None] * world
            dist.all_gather_object(per_rank, {"times": res["times"], "shard": [case.lo, case.hi]})
            results.append(
                {
                    "rows": rows,
                    "classes": classes,
                    "rank0": res,
                    "ranks": per_rank,
                }
            )
            del case
        if rank == 0:
            Path(out_path).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's finalisation once the results are written and the group is gone:
    # torch 2.11's gloo ranks have died of SIGABRT ("terminate called without an active
    # exception") in CI's compat runs, twice, in this harness and in tests/parallel_workers.py,
    # never reproduced here; finalisation with gloo's threads about is a known place for it
    # (pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_workers(
    cases: Sequence[Tuple[int, int]],
    reps: int,
    warmup: int,
    world: int = WORLD,
    threads: Optional[int] = None,
    seed: int = 0,
    timeout_s: float = 1800.0,
) -> List[dict]:
    """Run the workers (``world`` spawned processes) and return rank 0's results per case."""
    import torch.multiprocessing as mp

    threads = threads or max(1, torch.get_num_threads() // world)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only (inherited by the workers)
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        out_path = os.path.join(tmp, "rank0.json")
        args = (world, _free_port(), list(cases), reps, warmup, threads, seed, out_path)
        ctx = mp.spawn(_worker, args=args, nprocs=world, join=False)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                raise TimeoutError(f"the parallel benchmark's workers ran past {timeout_s:.0f} s")
        return json.loads(Path(out_path).read_text())


# ---- the parent: reference, records, report ------------------------------------------------------


def reference(rows: int, classes: int, reps: int, warmup: int, seed: int = 0) -> dict:
    """softmax_ext.cross_entropy on the full logits in this process: times and the loss."""
    import softmax_ext as se

    full = make_logits(rows, classes, 0, classes, seed).requires_grad_()
    target = make_target(rows, classes, seed)

    def step():
        loss = se.cross_entropy(full, target)
        return loss.detach(), torch.autograd.grad(loss, full)[0]

    for _ in range(max(1, warmup)):
        loss, _ = step()
    samples = interleaved({REFERENCE: Step(run=step)}, {REFERENCE: 1}, CpuTimer(), reps)
    return {"samples": samples[REFERENCE], "loss": float(loss)}


def _summary(seconds: Sequence[float]) -> dict:
    out = summarize(seconds)
    out["reps"] = len(seconds)
    out["samples_ms"] = [s * 1e3 for s in seconds]
    return out


def build_records(results: List[dict], refs: Dict[Tuple[int, int], dict], world: int):
    """Records (one per implementation and case) and per-case comparisons."""
    records, comparisons = [], []
    for res in results:
        rows, classes = res["rows"], res["classes"]
        r0 = res["rank0"]
        recs = {}
        for impl in IMPLS:
            rec = {"impl": impl, "rows": rows, "classes": classes, "dtype": "float32"}
            rec["processes"] = world
            rec.update(_summary(r0["times"][impl]))
            per_round = zip(*(rk["times"][impl] for rk in res["ranks"]), strict=True)
            slowest = [max(ts) for ts in per_round]
            rec["slowest_rank_median_ms"] = statistics.median(slowest) * 1e3
            rec["rank_median_ms"] = [
                statistics.median(rk["times"][impl]) * 1e3 for rk in res["ranks"]
            ]
            rec.update(r0["comms"][impl])
            rec["loss"] = r0["check"]["loss"][impl]
            recs[impl] = rec
        ref = refs.get((rows, classes))
        if ref is not None:
            rec = {"impl": REFERENCE, "rows": rows, "classes": classes, "dtype": "float32"}
            rec["processes"] = 1
            rec["threads"] = torch.get_num_threads()
            rec.update(_summary(ref["samples"]))
            rec.update(
                collectives={"fwd": {}, "bwd": {}},
                collective_calls={"fwd": 0, "bwd": 0},
                bytes={"fwd": 0, "bwd": 0},
                bytes_per_row=0.0,
                loss=ref["loss"],
            )
            recs[REFERENCE] = rec
        tp = recs["loss_parallel"]["median_ms"]
        for rec in recs.values():
            rec["ratio_vs_loss_parallel"] = rec["median_ms"] / tp
        ext, lp = recs["softmax_ext"], recs["loss_parallel"]
        comp = {
            "rows": rows,
            "classes": classes,
            "time_ratio": ext["median_ms"] / lp["median_ms"],
            "slowest_rank_time_ratio": ext["slowest_rank_median_ms"] / lp["slowest_rank_median_ms"],
            "bytes_per_row": {
                "softmax_ext": ext["bytes_per_row"],
                "loss_parallel": lp["bytes_per_row"],
            },
            "collective_calls": {
                "softmax_ext": sum(ext["collective_calls"].values()),
                "loss_parallel": sum(lp["collective_calls"].values()),
            },
            "grad_max_abs_diff": r0["check"]["grad_max_abs_diff"],
            "loss_max_abs_diff": max(abs(r["loss"] - ext["loss"]) for r in recs.values()),
        }
        if ref is not None:
            comp["parallel_vs_one_process"] = ext["median_ms"] / recs[REFERENCE]["median_ms"]
        comparisons.append(comp)
        records += list(recs.values())
    return records, comparisons


def _calls(counts: Dict[str, int]) -> str:
    """{'c10d_functional.all_reduce': 3} -> '3 (3 all_reduce)'; {} -> '0'."""
    total = sum(counts.values())
    if not total:
        return "0"
    parts = [f"{n} {k.rsplit('.', 1)[-1]}" for k, n in sorted(counts.items())]
    return f"{total} ({', '.join(parts)})"


def markdown(doc: dict) -> str:
    """The results as a Markdown table and one comparison line per case."""
    cfg = doc["config"]
    lines = [
        f"Vocabulary-parallel cross-entropy, fp32, index targets, mean; one training step "
        f"(forward + backward of the local logits); {cfg['world']} gloo processes, "
        f"{cfg['threads_per_rank']} thread(s) each; {cfg['reps']} interleaved repetitions after "
        f"{cfg['warmup']} warm-up; {doc['machine']['device']}.",
        "",
        "| N x V | implementation | ms / step (median) | min - max | slowest rank | "
        "/ loss_parallel | collectives fwd | collectives bwd | bytes / row |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["records"]:
        slow = r.get("slowest_rank_median_ms")
        lines.append(
            f"| {r['rows']} x {r['classes']} | {r['impl']} | {r['median_ms']:.1f} | "
            f"{r['min_ms']:.1f} - {r['max_ms']:.1f} | "
            f"{'-' if slow is None else f'{slow:.1f}'} | {r['ratio_vs_loss_parallel']:.2f} | "
            f"{_calls(r['collectives']['fwd'])} | {_calls(r['collectives']['bwd'])} | "
            f"{r['bytes_per_row']:.1f} |"
        )
    lines.append("")
    for c in doc["comparisons"]:
        b = c["bytes_per_row"]
        parts = [
            f"- {c['rows']} x {c['classes']}: softmax_ext / loss_parallel time "
            f"{c['time_ratio']:.2f} (slowest rank {c['slowest_rank_time_ratio']:.2f}); "
            f"collectives {c['collective_calls']['softmax_ext']} vs "
            f"{c['collective_calls']['loss_parallel']}; bytes / row {b['softmax_ext']:.1f} vs "
            f"{b['loss_parallel']:.1f}"
        ]
        if "parallel_vs_one_process" in c:
            parts.append(
                f"; softmax_ext on {doc['config']['world']} processes / on 1 process "
                f"{c['parallel_vs_one_process']:.2f}"
            )
        parts.append(
            f"; losses agree to {c['loss_max_abs_diff']:.1e}, gradients to "
            f"{c['grad_max_abs_diff']:.1e}"
        )
        lines.append("".join(parts))
    lines += [
        "",
        "Bytes / row: the payload each rank hands to the collectives in one step (forward and "
        "backward), over N. softmax_ext: "
        + BYTES_METHOD["softmax_ext"]
        + "; loss_parallel: "
        + BYTES_METHOD["loss_parallel"]
        + ".",
    ]
    return "\n".join(lines) + "\n"


def run_parallel(
    folder: Path,
    cases: Sequence[Tuple[int, int]] = CASES,
    reps: int = 5,
    warmup: int = 1,
    world: int = WORLD,
    reference_run: bool = True,
    seed: int = 0,
    log=print,
) -> dict:
    """Run every case; write ``parallel.json`` and ``parallel.md`` into ``folder``."""
    from . import report
    from .device import machine_info

    start = time.perf_counter()
    threads = max(1, torch.get_num_threads() // world)
    results = spawn_workers(cases, reps, warmup, world=world, threads=threads, seed=seed)
    refs = {}
    if reference_run:
        for rows, classes in cases:
            refs[(rows, classes)] = reference(rows, classes, reps, warmup, seed)
    records, comparisons = build_records(results, refs, world)
    doc = {
        "suite": "parallel",
        "machine": machine_info(torch.device("cpu")),
        "config": {
            "world": world,
            "backend": "gloo",
            "threads_per_rank": threads,
            "reference_threads": torch.get_num_threads(),
            "reps": reps,
            "warmup": warmup,
            "dtype": "float32",
            "target": "class indices",
            "reduction": "mean",
            "shards": [shard_bounds(v, world) for _, v in cases],
            "timing": "rank 0's perf_counter around each step, a barrier before each; "
            "interleaved rounds, order rotating",
            "bytes": "payload handed to the collectives per rank and step (not wire traffic)",
        },
        "records": records,
        "comparisons": comparisons,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    folder.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, folder / JSON_NAME)
    text = markdown(doc)
    (folder / MD_NAME).write_text(text)
    log(text)
    log(f"wrote {folder / JSON_NAME} and {folder / MD_NAME} ({doc['elapsed_s']} s)")
    return doc

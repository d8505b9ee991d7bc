"""The fused linear + cross-entropy suite: ``python -m benchmarks --suite linear``.

One training step (loss, then the gradients of the input and the projection weight) of
``cross_entropy(input @ W.T, target)`` at language-model shapes, by:

* softmax_ext: ``softmax_ext.linear_cross_entropy`` (chunked, the logits never whole);
* linear + softmax_ext.cross_entropy: ``F.linear`` then softmax_ext's fused loss;
* torch unfused: ``F.linear_cross_entropy(..., options=None)`` (torch 2.13+);
* torch chunked: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``.

Times are interleaved repetitions (medians). Memory is each implementation's peak RSS growth
during one step, measured in a fresh process (``python -m benchmarks.linear_ce --memory ...``)
after a small warm-up step; the "extra" memory leaves out the two gradients every implementation
must return. Goals for softmax_ext at each case: extra peak memory at most 1/8 of one logits
tensor, time at most the fastest of the other three.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .timing import CpuTimer, Step, interleaved, summarize

#: (rows N, hidden H, classes V, dtype) of the issue's cases.
CASES: Tuple[Tuple[int, int, int, str], ...] = (
    (8192, 1024, 32000, "float32"),
    (4096, 1024, 128256, "float32"),
    (4096, 1024, 128256, "bfloat16"),
)
QUICK_CASES = ((1024, 256, 8000, "float32"),)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_SHARE_GOAL = 1 / 8  # extra peak memory / one logits tensor
JSON_NAME = "linear.json"
PLOT_NAME = "linear_cross_entropy.png"

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def implementations() -> Dict[str, Optional[Fn]]:
    """name -> loss function of (input, weight, target); None where this torch lacks it."""
    import softmax_ext as se

    has_torch = hasattr(F, "linear_cross_entropy")

    def torch_chunked(x, w, t):
        return F.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions())

    return {
        "softmax_ext": lambda x, w, t: se.linear_cross_entropy(x, w, t),
        "linear + softmax_ext.cross_entropy": lambda x, w, t: se.cross_entropy(F.linear(x, w), t),
        "torch unfused": (lambda x, w, t: F.linear_cross_entropy(x, w, t)) if has_torch else None,
        "torch chunked": torch_chunked if has_torch else None,
    }


def make_inputs(n: int, h: int, v: int, dtype: str, seed: int = 0):
    """Input (n, h) and weight (v, h) requiring grad, int64 targets; seeded."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    x = torch.randn(n, h, generator=gen).to(dt).requires_grad_()
    w = (torch.randn(v, h, generator=gen) / h**0.5).to(dt).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    return x, w, t


def train_step(fn: Fn, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    """Loss and the gradients of input and weight (what one training step needs)."""
    loss = fn(x, w, t)
    return loss, *torch.autograd.grad(loss, (x, w))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory_here(impl: str, n: int, h: int, v: int, dtype: str) -> dict:
    """Peak RSS growth of one step of ``impl`` in this process (call it in a fresh one)."""
    fn = implementations()[impl]
    if fn is None:
        raise RuntimeError(f"{impl} is not available in torch {torch.__version__}")
    x, w, t = make_inputs(n, h, v, dtype)
    warm = min(n, 64)
    train_step(fn, x[:warm].detach().requires_grad_(), w, t[:warm])  # libraries, small buffers
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _rss_kib("VmRSS")
    out = train_step(fn, x, w, t)
    peak = _rss_kib("VmHWM")
    grads = sum(g.numel() * g.element_size() for g in out[1:])
    grown = (peak - before) * 1024
    return {"peak_growth_bytes": grown, "grad_bytes": grads, "extra_bytes": grown - grads}


def measure_memory(impl: str, n: int, h: int, v: int, dtype: str, timeout_s: float = 900) -> dict:
    """:func:`measure_memory_here` in a fresh Python process (its own heap and peak)."""
    cmd = [sys.executable, "-m", "benchmarks.linear_ce", "--memory", impl, str(n), str(h), str(v)]
    res = subprocess.run(
        [*cmd, dtype], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_case(n: int, h: int, v: int, dtype: str, reps: int, memory: bool, log=print) -> List[dict]:
    """Records (one per available implementation) of one case: times and memory."""
    impls = {k: f for k, f in implementations().items() if f is not None}
    x, w, t = make_inputs(n, h, v, dtype)
    steps = {name: Step(run=lambda fn=fn: train_step(fn, x, w, t)) for name, fn in impls.items()}
    errors: Dict[str, str] = {}

    def on_error(name: str, err: BaseException) -> None:
        errors[name] = f"{type(err).__name__}: {err}"

    for name, step in list(steps.items()):  # one untimed step each: compile, fault pages in
        try:
            step.run()
        except Exception as err:  # noqa: BLE001 - reported, the others go on
            on_error(name, err)
            steps.pop(name)
    samples = interleaved(steps, {k: 1 for k in steps}, CpuTimer(), reps, on_error)
    logits_bytes = n * v * torch.empty((), dtype=DTYPES[dtype]).element_size()
    records = []
    for name in impls:
        rec = {"impl": name, "rows": n, "hidden": h, "classes": v, "dtype": dtype}
        rec["logits_bytes"] = logits_bytes
        if name in samples and samples[name]:
            rec.update(summarize(samples[name]), reps=len(samples[name]))
        if name in errors:
            rec["error"] = errors[name]
        if memory:
            rec["memory"] = measure_memory(name, n, h, v, dtype)
        records.append(rec)
        log(_record_line(rec))
    return records


def _record_line(r: dict) -> str:
    parts = [f"{r['impl']:<36} {r['rows']}x{r['hidden']}->{r['classes']} {r['dtype']:<8}"]
    if "median_ms" in r:
        parts.append(f"{r['median_ms'] / 1e3:8.2f} s")
    mem = r.get("memory", {})
    if "extra_bytes" in mem:
        parts.append(f"extra peak {mem['extra_bytes'] / 2**20:8.0f} MiB")
    if "error" in r or "error" in mem:
        parts.append(f"error: {r.get('error') or mem.get('error')}")
    return "  ".join(parts)


def evaluate(records: List[dict]) -> List[dict]:
    """softmax_ext's goals per case: memory share and time against the fastest other."""
    out = []
    cases = sorted({(r["rows"], r["hidden"], r["classes"], r["dtype"]) for r in records})
    for case in cases:
        recs = {
            r["impl"]: r
            for r in records
            if (r["rows"], r["hidden"], r["classes"], r["dtype"]) == case
        }
        ours = recs.get("softmax_ext", {})
        others = [r for k, r in recs.items() if k != "softmax_ext" and "median_ms" in r]
        fastest = min(others, key=lambda r: r["median_ms"]) if others else None
        item = {"case": case}
        if "median_ms" in ours and fastest is not None:
            item["time_ratio"] = ours["median_ms"] / fastest["median_ms"]
            item["fastest_other"] = fastest["impl"]
            item["time_pass"] = item["time_ratio"] <= 1.0
        extra = ours.get("memory", {}).get("extra_bytes")
        if extra is not None:
            item["memory_share"] = extra / ours["logits_bytes"]
            item["memory_pass"] = item["memory_share"] <= MEMORY_SHARE_GOAL
        out.append(item)
    return out


def markdown(doc: dict) -> str:
    """The results as a Markdown table plus the goals' verdicts."""
    lines = [
        "| case (N x H -> V, dtype) | implementation | fwd+bwd time | extra peak memory |",
        "|---|---|---|---|",
    ]
    for r in doc["records"]:
        case = f"{r['rows']} x {r['hidden']} -> {r['classes']}, {r['dtype']}"
        t = f"{r['median_ms'] / 1e3:.2f} s" if "median_ms" in r else r.get("error", "-")
        mem = r.get("memory", {})
        m = (
            f"{mem['extra_bytes'] / 2**20:.0f} MiB"
            if "extra_bytes" in mem
            else mem.get("error", "-")
        )
        lines.append(f"| {case} | {r['impl']} | {t} | {m} |")
    lines.append("")
    for g in doc["goals"]:
        n, h, v, dt = g["case"]
        parts = [f"{n} x {h} -> {v} {dt}:"]
        if "time_ratio" in g:
            verdict = "PASS" if g["time_pass"] else "FAIL"
            parts.append(
                f"time / fastest other ({g['fastest_other']}) {g['time_ratio']:.2f} (goal <= 1) "
                f"{verdict};"
            )
        if "memory_share" in g:
            verdict = "PASS" if g["memory_pass"] else "FAIL"
            parts.append(
                f"extra memory / logits {g['memory_share']:.3f} (goal <= {MEMORY_SHARE_GOAL:g}) "
                f"{verdict}"
            )
        lines.append("- " + " ".join(parts))
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> Path:
    """Time and extra peak memory side by side, one group of bars per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = doc["records"]
    cases = sorted({(r["rows"], r["hidden"], r["classes"], r["dtype"]) for r in records})
    impls = list(dict.fromkeys(r["impl"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        times, mems = [], []
        for case in cases:
            r = next(
                (
                    r
                    for r in records
                    if r["impl"] == impl
                    and (r["rows"], r["hidden"], r["classes"], r["dtype"]) == case
                ),
                {},
            )
            times.append(r.get("median_ms", float("nan")) / 1e3)
            mems.append(r.get("memory", {}).get("extra_bytes", float("nan")) / 2**30)
        xs = [i + k * width for i in range(len(cases))]
        axes[0].bar(xs, times, width, label=impl)
        axes[1].bar(xs, mems, width, label=impl)
    labels = [f"{n}x{h}->{v}\n{dt}" for n, h, v, dt in cases]
    for ax, title in zip(axes, ("fwd+bwd time (s)", "extra peak memory (GiB)"), strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"linear + cross-entropy, one training step ({doc['machine']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_linear(
    folder: Path,
    cases: Sequence[Tuple[int, int, int, str]] = CASES,
    reps: int = 3,
    memory: bool = True,
    plots: bool = True,
    log=print,
) -> dict:
    """Run every case; write ``linear.json`` (and the plot) into ``folder``."""
    import platform

    start = time.perf_counter()
    records: List[dict] = []
    for case in cases:
        records += run_case(*case, reps=reps, memory=memory, log=log)
    doc = {
        "suite": "linear",
        "machine": {
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "records": records,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    doc["goals"] = evaluate(records)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JSON_NAME).write_text(json.dumps(doc, indent=1) + "\n")
    if plots:
        plot(doc, folder / PLOT_NAME)
    log(markdown(doc))
    return doc


def _main(argv: Optional[Sequence[str]] = None) -> int:
    """The memory child: ``--memory IMPL N H V DTYPE`` prints one JSON line."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.linear_ce")
    ap.add_argument("--memory", nargs=5, metavar=("IMPL", "N", "H", "V", "DTYPE"), required=True)
    a = ap.parse_args(argv)
    impl, n, h, v, dtype = a.memory
    print(json.dumps(measure_memory_here(impl, int(n), int(h), int(v), dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

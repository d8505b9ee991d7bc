"""Writing results: JSON documents and the readable results.md of a results folder.

A results folder (benchmarks/results/<device>/) holds up to three JSON documents, each written by
its own mode: results.json (the kernel sweep), core.json (``--suite core``) and trainer.json
(``--trainer``). results.md is regenerated from whichever of them exist after every run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

from .config import DIRECTIONS, DTYPES, IMPLS, MODES, OPS
from .core import NO_SLOWER_GOAL, SLOWER_HEADER, format_targets, slower_rows
from .runner import mode_of

RESULTS, CORE, TRAINER, MARKDOWN = "results.json", "core.json", "trainer.json", "results.md"


def _clean(obj: Any) -> Any:
    """NaN and infinities become None (JSON has neither); tuples become lists."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(doc: dict, path: Path) -> Path:
    """Write ``doc`` as indented JSON (atomically: a crash leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> Optional[dict]:
    """The document at ``path``, or None when there is none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt_ms(ms: Optional[float]) -> str:
    """Milliseconds with about three significant digits."""
    if ms is None:
        return "-"
    for limit, digits in ((100, 0), (10, 1), (1, 2), (0.1, 3)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.4f}"


def fmt_bytes(n: Optional[float]) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_gbps(gbps: Optional[float]) -> str:
    """Bandwidth in GB/s with two significant digits below 10."""
    if gbps is None:
        return "-"
    return f"{gbps:.1f}" if gbps >= 10 else f"{gbps:.2g}"


def fmt_x(x: Optional[float]) -> str:
    """A speed-up: '12.3x' (or '-')."""
    return "-" if x is None else f"{x:.2f}x"


def _table(header: List[str], rows: Iterable[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def machine_section(machine: dict) -> List[str]:
    """The machine a document was measured on, as a small table."""
    keys = [
        ("device", "device"),
        ("cpu_model", "CPU"),
        ("threads", "torch threads"),
        ("torch", "torch"),
        ("triton", "triton"),
        ("liger_kernel", "Liger-Kernel"),
        ("copy_gbps", "copy bandwidth (GB/s, read+write)"),
        ("clone_gbps", "copy into fresh memory, clone() (GB/s)"),
        ("transparent_hugepages", "transparent huge pages"),
        ("env", "environment"),
        ("timer", "timer"),
        ("git_commit", "commit"),
        ("date", "date"),
    ]
    rows = []
    for key, label in keys:
        v = machine.get(key)
        if v is None or v == {} or v == []:
            continue
        if isinstance(v, dict):
            v = " ".join(f"{k}={x}" for k, x in v.items())
        rows.append([label, f"{v:.1f}" if isinstance(v, float) else str(v)])
    if machine.get("copy_gbps_end") is not None:
        rows.append(["copy bandwidth at the end (GB/s)", f"{machine['copy_gbps_end']:.1f}"])
    return _table(["", ""], rows)


def _index(seq: Sequence[str], x: str) -> int:
    """Position of ``x`` in ``seq``; unknown names sort last."""
    return seq.index(x) if x in seq else len(seq)


def _sort_key(r: dict) -> tuple:
    dtype = _index(list(DTYPES), r["dtype"])
    mode = _index(MODES, mode_of(r))
    return (r["rows"] * r["classes"], r["rows"], dtype, mode, _index(IMPLS, r["impl"]))


def kernel_section(doc: dict) -> List[str]:
    """One table per op and direction: times, bandwidth, speed-ups, memory; small shapes have
    a row per mode (loop: back-to-back calls; single: one call between other work)."""
    records = doc.get("records", [])
    out: List[str] = []
    for op in OPS:
        for direction in DIRECTIONS:
            rs = sorted(
                (r for r in records if r["op"] == op and r["direction"] == direction), key=_sort_key
            )
            if not rs:
                continue
            out += ["", f"### {op} {direction}", ""]
            header = [
                "N x C",
                "dtype",
                "mode",
                "impl",
                "backend",
                "median ms",
                "min-max ms",
                "GB/s",
                "of copy",
                "vs torch",
                "vs torch.compile",
            ]
            mem = direction == "fwd+bwd"
            if mem:
                header += ["saved for bwd", "peak mem"]
            rows = []
            for r in rs:
                row = [
                    f"{r['rows']} x {r['classes']}",
                    r["dtype"],
                    mode_of(r),
                    r["impl"],
                    r["backend"],
                    fmt_ms(r["median_ms"]),
                    f"{fmt_ms(r['min_ms'])}-{fmt_ms(r['max_ms'])}",
                    fmt_gbps(r.get("gbps")),
                    "-" if r.get("frac_of_copy") is None else f"{100 * r['frac_of_copy']:.0f}%",
                    "1.00x" if r["impl"] == "torch" else fmt_x(r.get("speedup_vs_torch")),
                    "1.00x"
                    if r["impl"] == "torch.compile"
                    else fmt_x(r.get("speedup_vs_torch_compile")),
                ]
                if mem:
                    peak = r.get("cuda_peak_bytes", r.get("rss_peak_growth_bytes"))
                    row += [fmt_bytes(r.get("saved_bytes")), fmt_bytes(peak)]
                rows.append(row)
            out += _table(header, rows)
    return out


def slower_section(targets: dict) -> List[str]:
    """Every case where softmax_ext's median time exceeds torch eager's, worst first."""
    if "cases" not in targets:  # a document from before this table existed
        return []
    out = [
        f"Cases slower than torch eager (time ratio > {NO_SLOWER_GOAL:g}), "
        f"of {targets['cases']} compared:",
        "",
    ]
    rows = slower_rows(targets)
    if not rows:
        return out + ["none"]
    return out + _table(SLOWER_HEADER, rows)


def trainer_section(doc: dict) -> List[str]:
    """The Fashion-MNIST trainer comparison."""
    runs = doc.get("runs", [])
    base = next((r.get("train_seconds") for r in runs if r.get("name", "").startswith("d2l")), None)
    rows = []
    for r in runs:
        t = r.get("train_seconds")
        speed = fmt_x(base / t) if base and t else "-"
        acc = r.get("test_acc")
        rows.append(
            [
                r.get("name", "?"),
                "-" if t is None else f"{t:.1f}",
                "-" if r.get("wall_seconds") is None else f"{r['wall_seconds']:.1f}",
                str(r.get("epochs", "-")),
                "-" if acc is None else f"{acc:.4f}",
                speed,
                r.get("error") or "",
            ]
        )
    out = [
        "",
        f"Fashion-MNIST, softmax regression, batch 256, SGD lr 0.1 "
        f"({doc.get('machine', {}).get('device', '?')}, {doc.get('date', '')}).",
        "",
    ]
    out += _table(["run", "train s", "wall s", "epochs", "test acc", "vs d2l", "note"], rows)
    out += [
        "",
        "train s: the training loop as each run times it; wall s: the whole process "
        "(start-up, data loading and evaluation included).",
    ]
    return out


def problems_section(doc: dict) -> List[str]:
    """Skipped implementations and failed measurements."""
    out = []
    for name, why in (doc.get("skipped") or {}).items():
        out.append(f"- skipped {name}: {why}")
    for e in doc.get("errors") or []:
        where = ", ".join(f"{k}={v}" for k, v in e.items() if k != "error")
        out.append(f"- failed ({where}): {e['error']}")
    return out


def modes_text(config: dict) -> str:
    """What the kernel tables' medians are medians of."""
    text = (
        f"Medians of interleaved repetitions: mode loop, {config.get('reps')} repetitions of "
        "back-to-back calls"
    )
    if "single" in config.get("modes", []):
        text += (
            f"; mode single (shapes up to {config.get('single_max_elems')} elements), "
            f"{config.get('single_reps')} single calls, each after untimed other work"
        )
    return text + (
        " (fewer where the time budget of a group ran out: see `reps` in results.json). GB/s "
        "counts the minimum bytes; 'of copy' is that bandwidth over the copy bandwidth; 'vs X' "
        "is X's time over this row's time, in the same mode."
    )


def write_markdown(folder: Path) -> Path:
    """Regenerate ``folder``/results.md from the JSON documents there."""
    sweep, core, trainer = (read_json(folder / n) for n in (RESULTS, CORE, TRAINER))
    main = sweep or core or trainer or {}
    lines = [f"# softmax_ext benchmarks: {main.get('machine', {}).get('device', folder.name)}", ""]
    lines += [
        "Generated by `python -m benchmarks`; see docs/benchmarks.md for what the columns mean.",
        "",
    ]
    for title, doc in (("core suite (core.json)", core), ("sweep (results.json)", sweep)):
        if doc and doc.get("targets"):
            lines += [
                f"## Core targets, {title}",
                "",
                "```",
                format_targets(doc["targets"], doc["machine"]),
                "```",
                "",
            ]
            slower = slower_section(doc["targets"])
            lines += slower + ([""] if slower else [])
    if sweep and sweep.get("interrupted"):
        lines += ["**The sweep was interrupted: the tables below are partial.**", ""]
    if sweep:
        lines += ["## Machine", ""] + machine_section(sweep["machine"]) + [""]
        lines += ["## Kernels", "", modes_text(sweep["config"])]
        lines += kernel_section(sweep) + [""]
        problems = problems_section(sweep)
        if problems:
            lines += ["### Skipped and failed", ""] + problems + [""]
    if core:
        lines += ["## Core suite measurements", ""] + machine_section(core["machine"])
        lines += kernel_section(core) + [""] + problems_section(core) + [""]
    if trainer:
        lines += ["## Trainer"] + trainer_section(trainer) + [""]
    plots = sorted(p.name for p in folder.glob("*.png"))
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = folder / MARKDOWN
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path

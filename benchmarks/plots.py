"""PNG plots of a sweep (matplotlib, Agg backend: no display needed).

* classes_<op>.png: time (top) and achieved bandwidth (bottom) per implementation, one column per
  direction, shapes ordered by the number of classes; solid lines fp32, dashed bf16, dotted fp16.
* scaling.png: time against N x C (log-log) for every op and direction, with the copy floor
  (minimum bytes at the copy bandwidth) as a grey line: how each implementation's cost grows.

Both plot loop-mode records, the mode every shape has (single mode covers small shapes only).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from .bandwidth import floor_ms, min_bytes
from .config import DIRECTIONS, DTYPES, IMPLS, OPS
from .runner import mode_of

COLORS = {
    "softmax_ext": "tab:red",
    "torch": "tab:blue",
    "torch.compile": "tab:green",
    "liger": "tab:purple",
}
STYLES = {"float32": "-", "bfloat16": "--", "float16": ":"}
MARKERS = {"float32": "o", "bfloat16": "s", "float16": "^"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _present(records: List[dict], key: str, order) -> list:
    seen = {r[key] for r in records}
    return [k for k in order if k in seen] + sorted(seen - set(order))


def plot_classes(
    records: List[dict], op: str, path: Path, title: str, copy_gbps: float = 0.0
) -> Path:
    """Time and bandwidth against the shapes (ordered by classes) for one op; the copy
    bandwidth as a grey line on the bandwidth panels."""
    plt = _plt()
    rs = [r for r in records if r["op"] == op and mode_of(r) == "loop"]
    directions = _present(rs, "direction", DIRECTIONS)
    shapes = sorted({(r["rows"], r["classes"]) for r in rs}, key=lambda s: (s[1], s[0]))
    pos = {s: i for i, s in enumerate(shapes)}
    fig, axes = plt.subplots(
        2, len(directions), figsize=(5.2 * len(directions), 7.5), squeeze=False
    )
    for col, direction in enumerate(directions):
        for impl in _present(rs, "impl", IMPLS):
            for dtype in _present(rs, "dtype", list(DTYPES)):
                pts = sorted(
                    (pos[(r["rows"], r["classes"])], r)
                    for r in rs
                    if r["direction"] == direction and r["impl"] == impl and r["dtype"] == dtype
                )
                if not pts:
                    continue
                xs = [p for p, _ in pts]
                style = dict(
                    color=COLORS.get(impl),
                    linestyle=STYLES.get(dtype, ":"),
                    marker=MARKERS.get(dtype, "x"),
                    markersize=4,
                    label=f"{impl} {dtype}",
                )
                axes[0][col].plot(xs, [r["median_ms"] for _, r in pts], **style)
                axes[1][col].plot(xs, [r["gbps"] or 0 for _, r in pts], **style)
        for row, ylabel in enumerate(("median time (ms)", "achieved GB/s (minimum bytes)")):
            ax = axes[row][col]
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{n}x{c}" for n, c in shapes], rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.set_yscale("log")
                ax.set_title(f"{op} {direction}")
            else:
                ax.set_xlabel("shape N x C, ordered by number of classes C")
                if copy_gbps:
                    ax.axhline(
                        copy_gbps, color="grey", linewidth=2, alpha=0.6, label="copy bandwidth"
                    )
    axes[0][0].legend(fontsize=7)
    if copy_gbps:
        axes[1][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(records: List[dict], copy_gbps: float, path: Path, title: str) -> Path:
    """Time against N x C, log-log, with the fp32 copy floor, for every op and direction."""
    import torch

    plt = _plt()
    records = [r for r in records if mode_of(r) == "loop"]
    ops = _present(records, "op", OPS)
    directions = _present(records, "direction", DIRECTIONS)
    fig, axes = plt.subplots(
        len(directions), len(ops), figsize=(5 * len(ops), 3.8 * len(directions)), squeeze=False
    )
    for i, direction in enumerate(directions):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            rs = [r for r in records if r["op"] == op and r["direction"] == direction]
            for impl in _present(rs, "impl", IMPLS):
                for dtype in _present(rs, "dtype", list(DTYPES)):
                    pts = sorted(
                        (r["rows"] * r["classes"], r["median_ms"])
                        for r in rs
                        if r["impl"] == impl and r["dtype"] == dtype
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            color=COLORS.get(impl),
                            marker=MARKERS.get(dtype, "x"),
                            linestyle=STYLES.get(dtype, ":"),
                            markersize=4,
                            label=f"{impl} {dtype}",
                        )
            sizes = sorted({(r["rows"], r["classes"]) for r in rs}, key=lambda s: s[0] * s[1])
            if sizes and copy_gbps:
                floor = [
                    floor_ms(min_bytes(op, direction, n, c, torch.float32), copy_gbps)
                    for n, c in sizes
                ]
                ax.plot(
                    [n * c for n, c in sizes],
                    floor,
                    color="grey",
                    linewidth=2,
                    alpha=0.6,
                    label="copy floor fp32",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{op} {direction}")
            ax.set_xlabel("N x C (elements)")
            ax.set_ylabel("median time (ms)")
            ax.grid(True, which="both", alpha=0.25)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(doc: dict, folder: Path) -> List[Path]:
    """All plots of a sweep document into ``folder``."""
    records = doc.get("records", [])
    if not records:
        return []
    machine = doc.get("machine", {})
    title = f"{machine.get('device', '')}, torch {machine.get('torch', '')}"
    copy_gbps = machine.get("copy_gbps") or 0.0
    paths = [
        plot_classes(records, op, folder / f"classes_{op}.png", title, copy_gbps)
        for op in _present(records, "op", OPS)
    ]
    paths.append(plot_scaling(records, copy_gbps, folder / "scaling.png", title))
    return paths

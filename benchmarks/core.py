"""The core issue's speed and memory targets, read off fp32 cross-entropy fwd+bwd records.

* N=8192, C=32000: softmax_ext >= 10x faster than torch eager and >= 3x faster than
  torch.compile; its time within 2x of the copy floor (one read of the logits plus one write of
  the gradient at the copy bandwidth measured in the same run);
* N=256, C=10 (a Fashion-MNIST batch): softmax_ext time / eager time <= 1.5;
* memory saved for backward O(N), not O(N*C): at most 64 bytes per row at N=8192, C=32000.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .bandwidth import floor_ms, min_bytes
from .config import CORE_LARGE, CORE_SMALL, Config
from .runner import Sweep, find

MAX_SAVED_BYTES_PER_ROW = 64


def _rec(records: List[dict], impl: str, shape: tuple) -> Optional[dict]:
    return find(
        records,
        op="cross_entropy",
        direction="fwd+bwd",
        dtype="float32",
        rows=shape[0],
        classes=shape[1],
        impl=impl,
    )


def _target(
    name: str, value: Optional[float], goal: Optional[float], cmp: str, detail: str
) -> dict:
    ok = (
        None if value is None or goal is None else (value >= goal if cmp == ">=" else value <= goal)
    )
    return {"name": name, "value": value, "goal": goal, "cmp": cmp, "pass": ok, "detail": detail}


def evaluate(
    records: List[dict], copy_gbps: float, clone_gbps: Optional[float] = None
) -> Optional[dict]:
    """The targets that ``records`` allow to compute (None when softmax_ext was not measured at
    either core shape). ``clone_gbps`` adds an informative ratio against a copy into freshly
    allocated memory."""
    n, c = CORE_LARGE
    ext = _rec(records, "softmax_ext", CORE_LARGE)
    ext_small = _rec(records, "softmax_ext", CORE_SMALL)
    if ext is None and ext_small is None:
        return None
    items = []
    if ext is not None:
        eager, comp = _rec(records, "torch", CORE_LARGE), _rec(records, "torch.compile", CORE_LARGE)
        if eager is not None:
            items.append(
                _target(
                    f"speed-up vs torch eager at N={n}, C={c}",
                    eager["median_ms"] / ext["median_ms"],
                    10.0,
                    ">=",
                    f"{ext['median_ms']:.2f} ms vs {eager['median_ms']:.2f} ms",
                )
            )
        if comp is not None:
            items.append(
                _target(
                    f"speed-up vs torch.compile at N={n}, C={c}",
                    comp["median_ms"] / ext["median_ms"],
                    3.0,
                    ">=",
                    f"{ext['median_ms']:.2f} ms vs {comp['median_ms']:.2f} ms",
                )
            )
        nbytes = min_bytes("cross_entropy", "fwd+bwd", n, c, torch.float32)
        floor = floor_ms(nbytes, copy_gbps)
        items.append(
            _target(
                f"time / copy floor at N={n}, C={c}",
                ext["median_ms"] / floor,
                2.0,
                "<=",
                f"floor = {nbytes / 1e9:.2f} GB (read logits + write grad) at {copy_gbps:.1f} GB/s "
                f"= {floor:.2f} ms",
            )
        )
        if clone_gbps:
            fresh = floor_ms(nbytes, clone_gbps)
            items.append(
                _target(
                    f"time / fresh-allocation floor at N={n}, C={c}",
                    ext["median_ms"] / fresh,
                    None,
                    "<=",
                    f"same bytes at the clone() bandwidth {clone_gbps:.1f} GB/s "
                    f"(new pages fault in) = {fresh:.2f} ms; informative, no goal",
                )
            )
        saved = ext.get("saved_bytes")
        if saved is not None:
            eager_saved = (eager or {}).get("saved_bytes")
            detail = (
                f"{saved} B saved = {saved / n:.1f} B/row; O(N*C) would be {n * c * 4 / 1e6:.0f} MB"
            )
            if eager_saved is not None:
                detail += f"; torch eager saves {eager_saved / 1e6:.0f} MB"
            items.append(
                _target(
                    f"saved for backward per row at N={n}, C={c}",
                    saved / n,
                    MAX_SAVED_BYTES_PER_ROW,
                    "<=",
                    detail,
                )
            )
    if ext_small is not None:
        eager_small = _rec(records, "torch", CORE_SMALL)
        if eager_small is not None:
            items.append(
                _target(
                    f"time / torch eager time at N={CORE_SMALL[0]}, C={CORE_SMALL[1]}",
                    ext_small["median_ms"] / eager_small["median_ms"],
                    1.5,
                    "<=",
                    f"{ext_small['median_ms'] * 1e3:.1f} us vs "
                    f"{eager_small['median_ms'] * 1e3:.1f} us",
                )
            )
    verdicts = [i["pass"] for i in items if i["pass"] is not None]
    return {"items": items, "all_pass": bool(verdicts) and all(verdicts), "copy_gbps": copy_gbps}


def format_targets(targets: Optional[dict], machine: dict) -> str:
    """The targets as an aligned, plain-text block."""
    head = (
        f"Core targets: fp32 cross_entropy fwd+bwd on {machine.get('device')} "
        f"({machine.get('threads')} threads, copy {machine.get('copy_gbps', 0):.1f} GB/s)"
    )
    if not targets or not targets["items"]:
        return head + "\n  (no softmax_ext measurement at the core shapes)"
    lines = [head]
    width = max(len(i["name"]) for i in targets["items"])
    for i in targets["items"]:
        value = "n/a" if i["value"] is None else f"{i['value']:.2f}"
        verdict = {True: "PASS", False: "FAIL", None: "----"}[i["pass"]]
        goal = "(no goal)" if i["goal"] is None else f"(goal {i['cmp']} {i['goal']:g})"
        lines.append(f"  {i['name']:<{width}}  {value:>8}  {goal:<14} {verdict}   {i['detail']}")
    lines.append("  all targets met" if targets["all_pass"] else "  NOT all targets met")
    return "\n".join(lines)


def core_config(cfg: Config) -> Config:
    """The sweep settings of ``--suite core``: fp32 CE fwd+bwd at the two core shapes."""
    impls = [i for i in cfg.impls if i in ("softmax_ext", "torch", "torch.compile", "liger")]
    return cfg.with_(
        ops=("cross_entropy",),
        directions=("fwd+bwd",),
        dtypes=("float32",),
        shapes=(CORE_LARGE, CORE_SMALL),
        impls=impls,
        suite="core",
    )


def run_core(cfg: Config, log=None) -> dict:
    """Run the core suite; the result has the usual fields plus ``targets``."""
    sweep = Sweep(core_config(cfg), **({"log": log} if log else {}))
    results = sweep.run()
    m = results["machine"]
    results["targets"] = evaluate(results["records"], m["copy_gbps"], m.get("clone_gbps"))
    return results

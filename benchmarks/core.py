"""The core targets: issue 12's speed goals and the core issue's speed and memory targets, read off
a run's records.

* N=8192, C=32000, fp32 cross-entropy fwd+bwd: softmax_ext >= 10x faster than torch eager and
  >= 3x faster than torch.compile; its time within 2x of the copy floor (one read of the logits
  plus one write of the gradient at the copy bandwidth measured in the same run); memory saved
  for backward O(N), not O(N*C): at most 64 bytes per row;
* N=256, C=10 (a Fashion-MNIST batch), fp32 fwd+bwd, in loop mode and in single mode each:
  softmax_ext time / torch eager time <= 0.8 for cross_entropy, <= 1.0 for softmax and
  log_softmax;
* N=8192, C=32000, fp32 cross-entropy fwd+bwd with softcap=30 and lse_square_scale=1e-4
  (config.LM_OPTIONS, implementation "softmax_ext.lm", timed interleaved with the plain loss in
  the same run): at most 1.15x the plain loss's time (issue 13);
* no slower than torch eager anywhere: the worst softmax_ext / torch eager time over every case
  of the run (op x direction x dtype x shape x mode) <= 1.0; every case above 1.0 is listed.

A goal whose records the run lacks (a mode or an implementation left out, a failed measurement)
shows as not measured, and then not all targets are met.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .bandwidth import floor_ms, min_bytes
from .config import CORE_LARGE, CORE_SMALL, LM_IMPL, LM_OPTIONS, MODES, Config
from .runner import Sweep, mode_of

MAX_SAVED_BYTES_PER_ROW = 64
# softmax_ext time / torch eager time at CORE_SMALL, fp32 fwd+bwd, in each mode (issue 12).
SMALL_GOALS: Dict[str, float] = {"cross_entropy": 0.8, "softmax": 1.0, "log_softmax": 1.0}
# softmax_ext.lm time / softmax_ext time at CORE_LARGE, fp32 fwd+bwd (issue 13).
LM_GOAL = 1.15
# The worst softmax_ext / torch eager ratio over every case of a run.
NO_SLOWER_GOAL = 1.0
CASE_FIELDS = ("op", "direction", "dtype", "rows", "classes", "mode")


def _rec(
    records: List[dict],
    impl: str,
    shape: tuple,
    op: str = "cross_entropy",
    mode: str = "loop",
    dtype: str = "float32",
    direction: str = "fwd+bwd",
) -> Optional[dict]:
    """The record of ``impl`` for one case (None when the run has none)."""
    for r in records:
        if (
            r["impl"] == impl
            and r["op"] == op
            and r["direction"] == direction
            and r["dtype"] == dtype
            and (r["rows"], r["classes"]) == tuple(shape)
            and mode_of(r) == mode
        ):
            return r
    return None


def _target(
    name: str,
    value: Optional[float],
    goal: Optional[float],
    cmp: str,
    detail: str,
    key: str = "",
) -> dict:
    ok = (
        None if value is None or goal is None else (value >= goal if cmp == ">=" else value <= goal)
    )
    return {
        "id": key,
        "name": name,
        "value": value,
        "goal": goal,
        "cmp": cmp,
        "pass": ok,
        "detail": detail,
    }


def _missing(name: str, goal: float, cmp: str, key: str, what: str) -> dict:
    return _target(name, None, goal, cmp, f"not measured: no {what}", key)


def case_label(case: dict) -> str:
    """'log_softmax bwd bfloat16 4096x1000 loop'."""
    return (
        f"{case['op']} {case['direction']} {case['dtype']} {case['rows']}x{case['classes']} "
        f"{case['mode']}"
    )


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _us_or_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def _case_key(r: dict) -> tuple:
    """The values of CASE_FIELDS (mode: loop for records from before the modes existed)."""
    return tuple(mode_of(r) if k == "mode" else r[k] for k in CASE_FIELDS)


def eager_ratios(records: List[dict]) -> List[dict]:
    """softmax_ext's median time over torch eager's for every case where both were timed, the
    worst (largest) first."""
    eager = {_case_key(r): r for r in records if r["impl"] == "torch"}
    cases = []
    for r in records:
        if r["impl"] != "softmax_ext":
            continue
        key = _case_key(r)
        e = eager.get(key)
        if e is None or not e["median_ms"]:
            continue
        cases.append(
            {
                **dict(zip(CASE_FIELDS, key, strict=True)),
                "ext_ms": r["median_ms"],
                "eager_ms": e["median_ms"],
                "ratio": r["median_ms"] / e["median_ms"],
            }
        )
    cases.sort(key=lambda c: -c["ratio"])
    return cases


def _large_items(
    records: List[dict], ext: dict, copy_gbps: float, clone_gbps: Optional[float]
) -> List[dict]:
    """The targets at CORE_LARGE (fp32 cross-entropy fwd+bwd, loop mode)."""
    n, c = CORE_LARGE
    at = f"at N={n}, C={c}"
    items = []
    eager = _rec(records, "torch", CORE_LARGE)
    comp = _rec(records, "torch.compile", CORE_LARGE)
    for key, peer, rec, goal in (
        ("large_vs_eager", "torch eager", eager, 10.0),
        ("large_vs_compile", "torch.compile", comp, 3.0),
    ):
        name = f"cross_entropy: speed-up vs {peer} {at}"
        if rec is None:
            items.append(_missing(name, goal, ">=", key, f"record of {peer}"))
            continue
        items.append(
            _target(
                name,
                rec["median_ms"] / ext["median_ms"],
                goal,
                ">=",
                f"{ext['median_ms']:.2f} ms vs {rec['median_ms']:.2f} ms",
                key,
            )
        )
    nbytes = min_bytes("cross_entropy", "fwd+bwd", n, c, torch.float32)
    floor = floor_ms(nbytes, copy_gbps)
    items.append(
        _target(
            f"cross_entropy: time / copy floor {at}",
            ext["median_ms"] / floor,
            2.0,
            "<=",
            f"floor = {nbytes / 1e9:.2f} GB (read logits + write grad) at {copy_gbps:.1f} GB/s "
            f"= {floor:.2f} ms",
            "large_copy_floor",
        )
    )
    if clone_gbps:
        fresh = floor_ms(nbytes, clone_gbps)
        items.append(
            _target(
                f"cross_entropy: time / fresh-allocation floor {at}",
                ext["median_ms"] / fresh,
                None,
                "<=",
                f"same bytes at the clone() bandwidth {clone_gbps:.1f} GB/s "
                f"(new pages fault in) = {fresh:.2f} ms; informative, no goal",
                "large_fresh_floor",
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
                f"cross_entropy: saved for backward per row {at}",
                saved / n,
                MAX_SAVED_BYTES_PER_ROW,
                "<=",
                detail,
                "large_saved_per_row",
            )
        )
    return items


def _lm_item(records: List[dict], ext: dict) -> dict:
    """The cost of the language-model options at CORE_LARGE: softmax_ext.lm / softmax_ext."""
    n, c = CORE_LARGE
    opts = ", ".join(f"{k}={v:g}" for k, v in LM_OPTIONS.items())
    name = f"cross_entropy with {opts}: time / plain at N={n}, C={c}"
    lm = _rec(records, LM_IMPL, CORE_LARGE)
    if lm is None:
        return _missing(name, LM_GOAL, "<=", "large_lm_options", f"record of {LM_IMPL}")
    return _target(
        name,
        lm["median_ms"] / ext["median_ms"],
        LM_GOAL,
        "<=",
        f"{lm['median_ms']:.2f} ms vs {ext['median_ms']:.2f} ms",
        "large_lm_options",
    )


def _small_items(records: List[dict]) -> List[dict]:
    """The goals at CORE_SMALL: softmax_ext / torch eager, fp32 fwd+bwd, per op and mode."""
    n, c = CORE_SMALL
    items = []
    for op, goal in SMALL_GOALS.items():
        for mode in MODES:
            key = f"small_{op}_{mode}"
            name = f"{op}: time / torch eager at N={n}, C={c}, {mode}"
            ext = _rec(records, "softmax_ext", CORE_SMALL, op, mode)
            eager = _rec(records, "torch", CORE_SMALL, op, mode)
            if ext is None or eager is None:
                what = " and ".join(
                    w for w, r in (("softmax_ext", ext), ("torch eager", eager)) if r is None
                )
                items.append(_missing(name, goal, "<=", key, f"{mode}-mode record of {what}"))
                continue
            calls = "single calls" if mode == "single" else f"loops of {ext.get('inner')} calls"
            items.append(
                _target(
                    name,
                    ext["median_ms"] / eager["median_ms"],
                    goal,
                    "<=",
                    f"{_us_or_ms(ext['median_ms'])} vs {_us_or_ms(eager['median_ms'])} "
                    f"(medians of {ext.get('reps')} {calls})",
                    key,
                )
            )
    return items


def _worst_item(cases: List[dict]) -> dict:
    """The largest softmax_ext / torch eager ratio of the run, naming its case."""
    worst = cases[0]
    above = sum(1 for c in cases if c["ratio"] > NO_SLOWER_GOAL)
    return _target(
        f"every case: worst time / torch eager ({_cases(len(cases))})",
        worst["ratio"],
        NO_SLOWER_GOAL,
        "<=",
        f"{case_label(worst)}: {_us_or_ms(worst['ext_ms'])} vs {_us_or_ms(worst['eager_ms'])}; "
        f"{above} of {_cases(len(cases))} above {NO_SLOWER_GOAL:g}",
        "no_slower_anywhere",
    )


def evaluate(
    records: List[dict], copy_gbps: float, clone_gbps: Optional[float] = None
) -> Optional[dict]:
    """The targets that ``records`` concern (None when softmax_ext was measured neither at a core
    shape nor beside torch eager). ``clone_gbps`` adds an informative ratio against a copy into
    freshly allocated memory.

    The large-shape targets appear when softmax_ext's fp32 cross-entropy fwd+bwd was timed at
    CORE_LARGE, the small-shape goals when any of its fp32 fwd+bwd ops was timed at CORE_SMALL;
    within either group a goal without its records is listed as not measured. The result also
    holds ``cases`` (how many softmax_ext / torch eager ratios the run has) and ``slower`` (the
    cases above 1.0, worst first).
    """
    items: List[dict] = []
    ext_large = _rec(records, "softmax_ext", CORE_LARGE)
    if ext_large is not None:
        items += _large_items(records, ext_large, copy_gbps, clone_gbps)
        if any(r["impl"] == LM_IMPL for r in records):  # runs that timed it (the core suite)
            items.append(_lm_item(records, ext_large))
    if any(
        _rec(records, "softmax_ext", CORE_SMALL, op, mode) is not None
        for op in SMALL_GOALS
        for mode in MODES
    ):
        items += _small_items(records)
    cases = eager_ratios(records)
    if cases:
        items.append(_worst_item(cases))
    if not items:
        return None
    goals = [i for i in items if i["goal"] is not None]
    return {
        "items": items,
        "all_pass": bool(goals) and all(i["pass"] is True for i in goals),
        "not_measured": sum(1 for i in goals if i["pass"] is None),
        "copy_gbps": copy_gbps,
        "cases": len(cases),
        "slower": [c for c in cases if c["ratio"] > NO_SLOWER_GOAL],
    }


def format_targets(targets: Optional[dict], machine: dict) -> str:
    """The targets as an aligned, plain-text block."""
    head = (
        f"Core targets on {machine.get('device')} ({machine.get('threads')} threads, "
        f"copy {machine.get('copy_gbps') or 0:.1f} GB/s)\n"
        "  fp32 fwd+bwd unless a case is named; time / torch eager: softmax_ext's median time "
        "over eager's"
    )
    if not targets or not targets["items"]:
        return head + "\n  (no softmax_ext measurement at the core shapes or beside torch eager)"
    lines = [head]
    width = max(len(i["name"]) for i in targets["items"])
    for i in targets["items"]:
        value = "n/a" if i["value"] is None else f"{i['value']:.2f}"
        verdict = {True: "PASS", False: "FAIL", None: "----"}[i["pass"]]
        goal = "(no goal)" if i["goal"] is None else f"(goal {i['cmp']} {i['goal']:g})"
        lines.append(f"  {i['name']:<{width}}  {value:>8}  {goal:<14} {verdict}   {i['detail']}")
    if targets["all_pass"]:
        lines.append("  all targets met")
    else:
        missing = targets.get("not_measured") or 0
        lines.append("  NOT all targets met" + (f" ({missing} not measured)" if missing else ""))
    return "\n".join(lines)


def slower_rows(targets: Optional[dict]) -> List[List[str]]:
    """The cases slower than torch eager as table rows: case, softmax_ext, eager, ratio."""
    return [
        [
            f"{c['op']} {c['direction']}",
            c["dtype"],
            f"{c['rows']} x {c['classes']}",
            c["mode"],
            _us_or_ms(c["ext_ms"]),
            _us_or_ms(c["eager_ms"]),
            f"{c['ratio']:.2f}",
        ]
        for c in (targets or {}).get("slower") or []
    ]


SLOWER_HEADER = ["op direction", "dtype", "N x C", "mode", "softmax_ext", "torch eager", "ratio"]


def format_slower(targets: Optional[dict]) -> str:
    """The cases where softmax_ext is slower than torch eager, as a plain-text table (or 'none')."""
    if not targets or not targets.get("cases"):
        return "Slower than torch eager: (no case with both softmax_ext and torch eager)"
    rows = slower_rows(targets)
    head = (
        f"Slower than torch eager (time ratio > {NO_SLOWER_GOAL:g}), of {_cases(targets['cases'])}:"
    )
    if not rows:
        return head + " none"
    widths = [max(len(r[i]) for r in [SLOWER_HEADER, *rows]) for i in range(len(SLOWER_HEADER))]
    lines = [head]
    for r in [SLOWER_HEADER, *rows]:
        cells = "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
        lines.append(("  " + cells).rstrip())
    return "\n".join(lines)


def core_config(cfg: Config) -> Config:
    """The sweep settings of ``--suite core``: fp32 fwd+bwd of cross_entropy at both core shapes
    and of softmax and log_softmax at the small one, in the selected modes; only the core shapes
    among ``cfg.shapes`` (``--shapes 256x10``: the small-shape goals alone, in seconds)."""
    shapes = tuple(s for s in (CORE_LARGE, CORE_SMALL) if s in [tuple(x) for x in cfg.shapes])
    if not shapes:
        raise ValueError(
            f"--suite core measures {CORE_LARGE[0]}x{CORE_LARGE[1]} and "
            f"{CORE_SMALL[0]}x{CORE_SMALL[1]}: --shapes names neither"
        )
    plan = [(*CORE_LARGE, "float32", "cross_entropy")] if CORE_LARGE in shapes else []
    if CORE_SMALL in shapes:
        plan += [(*CORE_SMALL, "float32", op) for op in SMALL_GOALS]
    impls = tuple(cfg.impls)
    if CORE_LARGE in shapes and "softmax_ext" in impls and LM_IMPL not in impls:
        impls += (LM_IMPL,)
    return cfg.with_(
        impls=impls,
        ops=tuple(SMALL_GOALS),
        directions=("fwd+bwd",),
        dtypes=("float32",),
        shapes=shapes,
        plan=plan,
        suite="core",
    )


def run_core(cfg: Config, log=None) -> dict:
    """Run the core suite; the result has the usual fields plus ``targets``."""
    sweep = Sweep(core_config(cfg), **({"log": log} if log else {}))
    results = sweep.run()
    m = results["machine"]
    results["targets"] = evaluate(results["records"], m["copy_gbps"], m.get("clone_gbps"))
    return results

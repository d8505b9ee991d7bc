"""The sweep: for every shape, dtype and op, time every implementation in every direction.

Implementations of one (op, shape, dtype, direction) are timed in interleaved rounds in the same
process, right after one another, so their ratios are fair; the copy floor is measured in the
same run. Every group is timed in loop mode (back-to-back calls); small shapes also in single
mode (one call after untimed other work), each mode giving its own records (``mode``). A failure
of one implementation (out of memory, an unsupported dtype) is recorded in ``errors`` and the
others go on.
"""

from __future__ import annotations

import gc
import math
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import bandwidth, memory, peers
from .config import DTYPES, Config
from .device import machine_info
from .timing import (
    Calibration,
    Interference,
    calibrate,
    interleaved,
    interleaved_single,
    make_timer,
    summarize,
)
from .workloads import Inputs, make_inputs, make_step, private_copy

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _err_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


# Below this many bytes of logits, skip gc.collect() between measurements: it costs ~0.1-0.3 s
# with torch loaded, far more than the small measurement itself.
_COLLECT_BYTES = 32 << 20


def _free(device: torch.device, nbytes: int = _COLLECT_BYTES) -> None:
    """Release what the last measurement left (cycles included) before a big next one."""
    if nbytes >= _COLLECT_BYTES:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def impl_key(name: str) -> str:
    """'torch.compile' -> 'torch_compile' (for field names such as speedup_vs_torch_compile)."""
    return name.replace(".", "_")


def choose_reps(cfg: Config, cals: Dict[str, Calibration], direction: str) -> int:
    """cfg.reps, fewer (not below cfg.min_reps) when one round would overrun the group budget."""
    # a settled single-call repetition runs twice
    per_round = sum(
        c.inner * c.call_s * (2 if cfg.settle and c.inner == 1 else 1) for c in cals.values()
    )
    if direction == "bwd":
        per_round *= 2  # the untimed forward before each backward costs about as much
    if per_round <= 0:
        return cfg.reps
    return max(cfg.min_reps, min(cfg.reps, int(cfg.group_budget_s // per_round)))


def choose_single_reps(
    cfg: Config, cals: Dict[str, Calibration], direction: str, between_s: float
) -> int:
    """cfg.single_reps, fewer (not below cfg.min_reps) when they would overrun the group budget.

    One round is one interference run plus one call per implementation (plus the untimed
    forward of "bwd").
    """
    calls = 2 if direction == "bwd" else 1
    per_round = sum(between_s + calls * c.call_s for c in cals.values())
    if per_round <= 0:
        return cfg.single_reps
    floor = min(cfg.min_reps, cfg.single_reps)
    return max(floor, min(cfg.single_reps, int(cfg.group_budget_s // per_round)))


def mode_of(record: dict) -> str:
    """A record's timing mode; documents from before the modes existed timed loops."""
    return record.get("mode", "loop")


class Sweep:
    """One run: holds the machine description, records and errors as they accumulate."""

    def __init__(self, cfg: Config, log: Log = _log) -> None:
        self.cfg = cfg
        self.log = log
        self.timer = make_timer(cfg.device)
        self.records: List[dict] = []
        self.errors: List[dict] = []
        self._interference: Optional[Interference] = None
        self.between_s: Optional[float] = None
        self.impls, self.skipped = peers.available(
            cfg.device, cfg.impls, cfg.extra.get("ext_backend")
        )
        for name, why in self.skipped.items():
            log(f"skipping {name}: {why}")

    def error(self, where: dict, impl: str, err: BaseException) -> None:
        """Record a failed measurement and say so."""
        self.errors.append({**where, "impl": impl, "error": _err_text(err)})
        self.log(f"  ! {impl} failed at {where}: {_err_text(err)}")
        if self.cfg.extra.get("verbose"):
            traceback.print_exception(err)

    def interference(self) -> Interference:
        """The untimed work between single calls (made, and timed once, on first use)."""
        if self._interference is None:
            self._interference = Interference(self.cfg.device)
            self.between_s = self._interference.seconds()
        return self._interference

    def run(self) -> dict:
        """Measure everything the config selects; return the results document."""
        cfg = self.cfg
        t_start = time.perf_counter()
        machine = machine_info(cfg.device)
        machine["timer"] = self.timer.kind
        self.log(
            f"device: {machine['device']}, {machine['threads']} threads, torch {machine['torch']}"
        )
        copy = bandwidth.copy_bandwidth(cfg.device, cfg.copy_mib)
        machine.update(copy)
        self.log(
            f"copy bandwidth: {copy['copy_gbps']:.1f} GB/s ({cfg.copy_mib} MiB, read+write; "
            f"into fresh memory: {copy['clone_gbps']:.1f} GB/s)"
        )
        interrupted = False
        try:
            for rows, classes, dtype_name, op in cfg.groups():
                self.measure_op(op, rows, classes, dtype_name, machine["copy_gbps"])
        except KeyboardInterrupt:  # keep what was measured: a long sweep stopped is not lost
            interrupted = True
            self.log("interrupted: writing the measurements so far")
        end = bandwidth.copy_bandwidth(cfg.device, cfg.copy_mib)
        machine["copy_gbps_end"], machine["clone_gbps_end"] = end["copy_gbps"], end["clone_gbps"]
        add_speedups(self.records)
        return {
            "machine": machine,
            "config": {
                "ops": list(cfg.ops),
                "directions": list(cfg.directions),
                "impls": list(cfg.impls),
                "dtypes": list(cfg.dtypes),
                "shapes": [list(s) for s in cfg.shapes],
                "plan": None if cfg.plan is None else [list(g) for g in cfg.plan],
                "modes": list(cfg.modes),
                "reps": cfg.reps,
                "single_reps": cfg.single_reps,
                "single_max_elems": cfg.single_max_elems,
                "single_between_ms": None if self.between_s is None else self.between_s * 1e3,
                "group_budget_s": cfg.group_budget_s,
                "rep_target_s": cfg.rep_target_s,
                "settle": cfg.settle,
                "suite": cfg.suite,
            },
            "records": self.records,
            "errors": self.errors,
            "skipped": self.skipped,
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "interrupted": interrupted,
        }

    def measure_op(
        self, op: str, rows: int, classes: int, dtype_name: str, copy_gbps: float
    ) -> None:
        """All directions of ``op`` at one shape and dtype."""
        cfg, device = self.cfg, self.cfg.device
        dtype = DTYPES[dtype_name]
        where = {"op": op, "rows": rows, "classes": classes, "dtype": dtype_name}
        size = rows * classes * bandwidth.element_size(dtype)
        impls = [i for i in self.impls if op in i.ops]
        if not impls or not ("loop" in cfg.modes or cfg.single_mode_at(rows, classes)):
            return
        try:
            inputs = make_inputs(op, rows, classes, dtype, device, cfg.seed)
        except Exception as err:  # e.g. the shape does not fit in memory
            self.error({**where, "direction": "*"}, "*", err)
            _free(device, size)
            return
        if any(i.name == "torch.compile" for i in impls):
            peers.fresh_compile_cache()
        fns, own = {}, {}
        for impl in impls:
            try:
                fns[impl.name] = impl.make(op)
                own[impl.name] = private_copy(inputs) if impl.writes_input else inputs
            except Exception as err:
                self.error({**where, "direction": "*"}, impl.name, err)
        for direction in cfg.directions:
            self.measure_direction(where, direction, impls, fns, own, copy_gbps, dtype)
        del inputs, fns, own
        _free(device, size)

    def measure_direction(
        self,
        where: dict,
        direction: str,
        impls: list,
        fns: dict,
        own: Dict[str, Inputs],
        copy_gbps: float,
        dtype: torch.dtype,
    ) -> None:
        """Warm up, calibrate and time every implementation of one direction, interleaved."""
        cfg = self.cfg
        where = {**where, "direction": direction}
        size = where["rows"] * where["classes"] * bandwidth.element_size(dtype)
        steps, cals = {}, {}
        for impl in impls:
            if impl.name not in fns:
                continue
            try:
                steps[impl.name] = make_step(fns[impl.name], own[impl.name], direction)
                cals[impl.name] = calibrate(
                    steps[impl.name], self.timer, cfg.warmup_s, cfg.rep_target_s
                )
            except Exception as err:
                steps.pop(impl.name, None)
                self.error(where, impl.name, err)
                _free(cfg.device, size)
        if not steps:
            return
        runs: Dict[str, Tuple[int, Dict[str, List[float]]]] = {}

        def on_error(name: str, err: BaseException) -> None:
            self.error(where, name, err)

        if "loop" in cfg.modes:
            reps = choose_reps(cfg, cals, direction)
            samples = interleaved(
                steps,
                {n: c.inner for n, c in cals.items()},
                self.timer,
                reps,
                on_error=on_error,
                settle=cfg.settle,
            )
            runs["loop"] = (reps, samples)
        if cfg.single_mode_at(where["rows"], where["classes"]):
            between = self.interference()
            reps = choose_single_reps(cfg, cals, direction, self.between_s or 0.0)
            # an implementation that failed in the loop would only fail again
            alive = runs["loop"][1] if "loop" in runs else steps
            samples = interleaved_single(
                {n: s for n, s in steps.items() if n in alive}, self.timer, reps, between, on_error
            )
            runs["single"] = (reps, samples)
        del steps
        _free(cfg.device, size)
        mem: Dict[str, dict] = {}
        if direction == "fwd+bwd" and cfg.memory:
            for impl in impls:
                if any(samples.get(impl.name) for _, samples in runs.values()):
                    try:
                        mem[impl.name] = memory.measure(fns[impl.name], own[impl.name], cfg.device)
                    except Exception as err:
                        self.error({**where, "what": "memory"}, impl.name, err)
                    _free(cfg.device, size)
        nbytes = bandwidth.min_bytes(where["op"], direction, where["rows"], where["classes"], dtype)
        for mode, (reps, samples) in runs.items():
            line = []
            for impl in impls:
                if not samples.get(impl.name):
                    continue
                stats = summarize(samples[impl.name])
                gbps, frac = bandwidth.achieved(nbytes, stats["median_ms"] / 1e3, copy_gbps)
                rec = {
                    **where,
                    "mode": mode,
                    "impl": impl.name,
                    "backend": impl.backend,
                    **stats,
                    "reps": len(samples[impl.name]),
                    "inner": cals[impl.name].inner if mode == "loop" else 1,
                    "first_call_ms": cals[impl.name].first_call_s * 1e3,
                    "bytes": nbytes,
                    "gbps": gbps,
                    "frac_of_copy": frac,
                    "peak_mem_bytes": None,
                    **mem.get(impl.name, {}),
                }
                self.records.append(rec)
                line.append(f"{impl.name} {stats['median_ms']:.4f} ms")
            self.log(
                f"{where['op']} {where['dtype']} {where['rows']}x{where['classes']} "
                f"{direction} {mode} (x{reps}): " + " | ".join(line)
            )


def add_speedups(records: List[dict]) -> None:
    """speedup_vs_<peer> = peer's median / this record's median, for every peer timed with it
    (same op, direction, shape, dtype and mode)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault(
            (r["op"], r["direction"], r["rows"], r["classes"], r["dtype"], mode_of(r)), []
        ).append(r)
    for group in groups.values():
        for r in group:
            for other in group:
                if other is not r and r["median_ms"] > 0:
                    r[f"speedup_vs_{impl_key(other['impl'])}"] = other["median_ms"] / r["median_ms"]


def nan_to_none(x: float) -> Optional[float]:
    """JSON has no NaN: None instead."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

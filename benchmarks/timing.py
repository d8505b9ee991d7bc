"""Timing: a CPU and a CUDA timer, warm-up with loop-count calibration, interleaved repetitions.

A :class:`Step` is the work of one implementation for one measurement: ``run`` is timed,
``prepare`` (when given) runs untimed before every timed call, e.g. the forward pass that a
backward-only measurement needs afresh each time.

Two modes: :func:`interleaved` times loops of back-to-back calls ("loop"), and
:func:`interleaved_single` times one call at a time after untimed :class:`Interference`
("single"), as a training step calls the loss once between other work.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


@dataclass
class Step:
    """Timed work (``run``) and optional untimed set-up before each call (``prepare``)."""

    run: Callable[[], Any]
    prepare: Optional[Callable[[], Any]] = None


class CpuTimer:
    """Wall-clock timing with time.perf_counter; CPU kernels are synchronous."""

    kind = "perf_counter"

    def sync(self) -> None:
        """Nothing to wait for on the CPU."""

    def measure(self, step: Step, inner: int) -> float:
        """Seconds per call of ``step.run``, averaged over ``inner`` back-to-back calls."""
        if step.prepare is None:
            t0 = time.perf_counter()
            for _ in range(inner):
                step.run()
            return (time.perf_counter() - t0) / inner
        total = 0.0
        for _ in range(inner):
            step.prepare()
            t0 = time.perf_counter()
            step.run()
            total += time.perf_counter() - t0
        return total / inner

    def once(self, step: Step) -> float:
        """Seconds of one call of ``step.run`` (after ``step.prepare``, untimed)."""
        if step.prepare is not None:
            step.prepare()
        t0 = time.perf_counter_ns()
        step.run()
        return (time.perf_counter_ns() - t0) / 1e9


class CudaTimer:
    """GPU time between CUDA events recorded on the current stream around the timed calls."""

    kind = "cuda_events"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        """Wait for all queued GPU work."""
        torch.cuda.synchronize(self.device)

    def measure(self, step: Step, inner: int) -> float:
        """Seconds per call of ``step.run``; with ``prepare``, only the events around ``run``."""
        self.sync()
        if step.prepare is None:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                step.run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        pairs = []
        for _ in range(inner):
            step.prepare()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step.run()
            end.record()
            pairs.append((start, end))
        self.sync()
        return sum(s.elapsed_time(e) for s, e in pairs) / 1e3 / inner

    def once(self, step: Step) -> float:
        """GPU seconds of one call of ``step.run`` (after ``step.prepare``, untimed)."""
        return self.measure(step, 1)


class Interference:
    """Untimed work between single calls: a matrix product and a pure-Python loop.

    A loop of back-to-back calls keeps the caches, the branch predictors and the interpreter's
    inline caches warm for the code it times; a loss called once per training step finds them
    holding the model's work instead. The product ((size x size) @ (size x size/4) in float32,
    384 KiB touched at 256, about a core's L2; 8 MFLOP, a fraction of a millisecond on a CPU
    core) evicts the data and runs torch's dispatcher and thread pool on other work; the Python
    loop (dict, tuple and hash operations) evicts the interpreter's state and returns to it, as
    a training loop does between its calls.
    """

    def __init__(self, device: torch.device, size: int = 256, py_iters: int = 1000) -> None:
        gen = torch.Generator(device=device).manual_seed(1)
        self.a = torch.randn(size, size, generator=gen, device=device)
        self.b = torch.randn(size, max(1, size // 4), generator=gen, device=device)
        self.py_iters = py_iters
        self.timer = make_timer(device)
        self.sink: Any = None

    def __call__(self) -> None:
        """Run the work once and wait for it (on a GPU too)."""
        out = self.a @ self.b
        table: Dict[int, int] = {}
        acc = 0
        for i in range(self.py_iters):
            acc ^= hash((i, acc & 1023))
            table[acc & 255] = i
        self.sink = (out, len(table))  # kept: nothing is freed inside the next timed call
        self.timer.sync()

    def seconds(self, reps: int = 20) -> float:
        """Median time of one run (to budget the single-mode repetitions)."""
        self()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            self()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


def make_timer(device: torch.device):
    """The timer for ``device``."""
    return CudaTimer(device) if device.type == "cuda" else CpuTimer()


@dataclass
class Calibration:
    """What warm-up learned: the first call's time (compilation included), a per-call estimate,
    and how many calls one timed repetition should loop."""

    first_call_s: float
    call_s: float
    inner: int


def calibrate(
    step: Step, timer, warmup_s: float, rep_target_s: float, max_inner: int = 10000
) -> Calibration:
    """Warm ``step`` up (first call separately: it may compile) and choose its loop count."""
    t0 = time.perf_counter()
    if step.prepare is not None:
        step.prepare()
    step.run()
    timer.sync()
    first = time.perf_counter() - t0
    samples: List[float] = []
    start = time.perf_counter()
    while True:
        samples.append(timer.measure(step, 1))
        elapsed = time.perf_counter() - start
        # Three calls at least, but one is enough warm-up for calls of a second or more.
        enough = len(samples) >= 3 or elapsed >= max(1.0, warmup_s)
        if enough and (elapsed >= warmup_s or len(samples) >= 200):
            break
    call_s = max(statistics.median(samples[len(samples) // 2 :]), 1e-9)
    inner = int(min(max_inner, max(1, round(rep_target_s / call_s))))
    return Calibration(first, call_s, inner)


def interleaved(
    steps: Dict[str, Step],
    inner: Dict[str, int],
    timer,
    reps: int,
    on_error: Optional[Callable[[str, BaseException], None]] = None,
    settle: bool = False,
) -> Dict[str, List[float]]:
    """Time every step ``reps`` times, round-robin, rotating the order each round.

    Interleaving spreads slow drifts of the machine (clocks, a neighbour's load) over all
    implementations alike instead of penalising whichever happens to run last. A step that
    raises is reported to ``on_error`` (re-raised without one) and leaves the rotation.

    ``settle``: a repetition that is a single call (a long one) follows one untimed call of the
    same step. On a VM the first writes after another implementation's multi-GB allocations run up
    to 3x slower (measured on the CPU VM: a 1 GB ``copy_`` into a preallocated tensor took
    100-250 ms right after torch eager's cross-entropy step, 66 ms otherwise); the copy floor is
    measured in steady state, so each implementation is too.
    """

    def sample(name: str) -> float:
        if settle and inner[name] == 1:
            timer.measure(steps[name], 1)
        return timer.measure(steps[name], inner[name])

    return _round_robin(list(steps), reps, sample, on_error)


def interleaved_single(
    steps: Dict[str, Step],
    timer,
    reps: int,
    between: Callable[[], Any],
    on_error: Optional[Callable[[str, BaseException], None]] = None,
) -> Dict[str, List[float]]:
    """Time one call of every step ``reps`` times, round-robin like :func:`interleaved`, each
    call right after an untimed run of ``between`` (e.g. :class:`Interference`).

    Each sample is exactly one call (``timer.once``: perf_counter_ns on a CPU), so what a
    training step pays per call (dispatch, argument checks, allocation, a cold cache) is in
    it, not amortised over a loop.
    """

    def sample(name: str) -> float:
        between()
        return timer.once(steps[name])

    return _round_robin(list(steps), reps, sample, on_error)


def _round_robin(
    names: List[str],
    reps: int,
    sample: Callable[[str], float],
    on_error: Optional[Callable[[str, BaseException], None]],
) -> Dict[str, List[float]]:
    """``reps`` rounds of ``sample(name)`` over ``names``, the order rotating each round."""
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            try:
                samples[name].append(sample(name))
            except Exception as err:  # e.g. out of memory: drop this implementation, keep going
                if on_error is None:
                    raise
                on_error(name, err)
                names.remove(name)
                samples.pop(name)
    return samples


def summarize(seconds: Sequence[float]) -> dict:
    """median / min / max in milliseconds."""
    return {
        "median_ms": statistics.median(seconds) * 1e3,
        "min_ms": min(seconds) * 1e3,
        "max_ms": max(seconds) * 1e3,
    }

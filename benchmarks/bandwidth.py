"""Bandwidth: the copy floor of this machine and the minimum bytes each measurement must move.

The copy floor is the time of ``dst.copy_(src)`` on a tensor far larger than the caches; its
bandwidth counts one read plus one write. A kernel that moves its minimum bytes at that bandwidth
cannot be much faster, so ``frac_of_copy`` (achieved / copy bandwidth) says how close it is.
"""
from __future__ import annotations

import statistics

import torch

from .timing import Step, make_timer


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def min_bytes(op: str, direction: str, rows: int, classes: int, dtype: torch.dtype) -> int:
    """Bytes an ideal implementation moves: each input read once, each output written once.

    softmax / log_softmax: fwd reads x, writes y (2 N*C); bwd reads y and dy, writes dx (3 N*C);
    fwd+bwd reads x and dy, writes y and dx (4 N*C).
    cross_entropy (int64 targets, scalar loss): fwd reads logits and targets; bwd and fwd+bwd read
    logits and targets and write the gradient (2 N*C). Per-row statistics (lse) are not counted:
    they are an implementation's choice, and O(N).
    """
    nc = rows * classes * element_size(dtype)
    if op == "cross_entropy":
        targets = rows * 8
        return (nc if direction == "fwd" else 2 * nc) + targets
    if op in ("softmax", "log_softmax"):
        return {"fwd": 2, "bwd": 3, "fwd+bwd": 4}[direction] * nc
    raise ValueError(f"unknown op {op!r}")


def copy_bandwidth(device: torch.device, mib: int = 256, reps: int = 10) -> dict:
    """Median bandwidth of ``dst.copy_(src)`` for a ``mib`` MiB float32 tensor (read + write).

    Returns {"copy_gbps": GB/s (1e9 bytes), "copy_mib": mib, "copy_ms": median ms per copy,
    "copy_gbps_min", "copy_gbps_max"}.
    """
    numel = mib * (1 << 20) // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = make_timer(device)
    step = Step(run=lambda: dst.copy_(src))
    for _ in range(2):
        timer.measure(step, 1)
    times = [timer.measure(step, 1) for _ in range(reps)]
    moved = 2 * numel * 4
    med = statistics.median(times)
    del src, dst
    return {"copy_gbps": moved / med / 1e9, "copy_mib": mib, "copy_ms": med * 1e3,
            "copy_gbps_min": moved / max(times) / 1e9, "copy_gbps_max": moved / min(times) / 1e9}


def achieved(bytes_moved: int, seconds: float, copy_gbps: float) -> tuple:
    """(GB/s, fraction of the copy bandwidth) for ``bytes_moved`` in ``seconds``."""
    gbps = bytes_moved / seconds / 1e9 if seconds > 0 else float("nan")
    return gbps, (gbps / copy_gbps if copy_gbps else float("nan"))


def floor_ms(bytes_moved: int, copy_gbps: float) -> float:
    """The time ``bytes_moved`` take at the copy bandwidth, in milliseconds."""
    return bytes_moved / (copy_gbps * 1e9) * 1e3

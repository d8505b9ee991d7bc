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
    """Bandwidth of copying a ``mib`` MiB float32 tensor (bytes = read + write), two ways:

    * ``copy_gbps``: ``dst.copy_(src)`` into a preallocated tensor: the floor of the targets;
    * ``clone_gbps``: ``src.clone()``, a freshly allocated destination each time. On a CPU the
      fresh pages fault in on first touch (the kernel zeroes them), which can cost several times
      the copy itself; every op that returns a new N x C tensor (a gradient) pays this too.

    Returns medians (GB/s, 1e9 bytes) with min/max, "copy_ms" and "copy_mib".
    """
    numel = mib * (1 << 20) // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = make_timer(device)
    copy, clone = Step(run=lambda: dst.copy_(src)), Step(run=src.clone)
    for _ in range(2):
        timer.measure(copy, 1)
        timer.measure(clone, 1)
    times: dict = {"copy": [], "clone": []}
    for _ in range(reps):  # interleaved, like everything else
        times["copy"].append(timer.measure(copy, 1))
        times["clone"].append(timer.measure(clone, 1))
    moved = 2 * numel * 4
    out = {"copy_mib": mib, "copy_ms": statistics.median(times["copy"]) * 1e3}
    for kind, ts in times.items():
        out[f"{kind}_gbps"] = moved / statistics.median(ts) / 1e9
        out[f"{kind}_gbps_min"] = moved / max(ts) / 1e9
        out[f"{kind}_gbps_max"] = moved / min(ts) / 1e9
    return out


def achieved(bytes_moved: int, seconds: float, copy_gbps: float) -> tuple:
    """(GB/s, fraction of the copy bandwidth) for ``bytes_moved`` in ``seconds``."""
    gbps = bytes_moved / seconds / 1e9 if seconds > 0 else float("nan")
    return gbps, (gbps / copy_gbps if copy_gbps else float("nan"))


def floor_ms(bytes_moved: int, copy_gbps: float) -> float:
    """The time ``bytes_moved`` take at the copy bandwidth, in milliseconds."""
    return bytes_moved / (copy_gbps * 1e9) * 1e3

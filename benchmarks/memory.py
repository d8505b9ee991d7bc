"""Memory of one forward+backward step.

* saved for backward (any device): storage bytes of the tensors autograd saves, seen through
  torch.autograd.graph.saved_tensors_hooks, each storage once, leaving out the inputs themselves
  (saving a reference to the logits costs nothing). O(N) for a fused cross-entropy, O(N*C) for
  one that keeps the probabilities.
* CPU: peak RSS growth during the step. Linux lets a process reset its peak RSS
  (``/proc/self/clear_refs`` <- 5, then VmHWM); elsewhere a psutil sampling thread (1 ms) stands in.
  glibc's free heap is trimmed first; memory the allocator still holds may be reused unseen,
  so this is a lower bound. Saved bytes are exact.
* CUDA: torch.cuda.max_memory_allocated() during the step minus the allocation before it.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Callable, Optional, Tuple

import torch

from .peers import Fn
from .workloads import Inputs, forward_backward, storages


def saved_bytes(fn: Fn, inputs: Inputs) -> int:
    """Bytes autograd saves for backward in ``fn``'s forward, the inputs excluded."""
    skip = storages(inputs)
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip and ptr not in seen:
                seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_backward(fn, inputs)
    return int(sum(seen.values()))


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _sampled_peak(step: Callable[[], object]) -> Tuple[int, int]:
    """(baseline RSS, peak RSS) while ``step`` runs, sampled by a psutil thread."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        step()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return base, peak[0]


def _release_free_heap() -> None:
    """Hand glibc's free heap pages back to the OS, so the step has to fault its memory in
    again (otherwise blocks freed by earlier steps are reused unseen by RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss_growth(fn: Fn, inputs: Inputs) -> Tuple[int, str]:
    """(peak RSS growth in bytes during one forward+backward, the method used)."""
    _release_free_heap()
    if _reset_peak_rss():
        import psutil

        base = psutil.Process().memory_info().rss
        forward_backward(fn, inputs)
        peak = (_status_kib("VmHWM") or 0) * 1024
        return max(0, peak - base), "vmhwm"
    base, peak = _sampled_peak(lambda: forward_backward(fn, inputs))
    return max(0, peak - base), "psutil-sampled"


def cuda_peak(fn: Fn, inputs: Inputs, device: torch.device) -> int:
    """Peak CUDA allocation during one forward+backward above what was allocated before."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    forward_backward(fn, inputs)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def measure(fn: Fn, inputs: Inputs, device: torch.device) -> dict:
    """The memory fields of a fwd+bwd record.

    ``peak_mem_bytes`` is the CUDA peak on a GPU and the saved-for-backward bytes on a CPU (the
    exact number; RSS growth is reported beside it as ``rss_peak_growth_bytes``).
    """
    out = {"saved_bytes": saved_bytes(fn, inputs)}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = cuda_peak(fn, inputs, device)
        out["peak_mem_bytes"] = out["cuda_peak_bytes"]
        out["peak_mem_kind"] = "cuda_max_allocated"
    else:
        out["rss_peak_growth_bytes"], out["rss_method"] = rss_growth(fn, inputs)
        out["peak_mem_bytes"] = out["saved_bytes"]
        out["peak_mem_kind"] = "saved_for_backward"
    return out

"""The process around a run: the device, CPU threads, and Ctrl-C between two training steps."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import torch


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def threads_for(config: dict, requested: Optional[int]) -> int:
    """CPU threads for the run: ``--threads`` if given, else 1 for the softmax regressions and
    all cores but one for the MLP (torch's choice on CUDA).

    A 256x784 by 784x10 product is too small to split: one thread is fastest. The MLP's products
    are worth splitting, but OpenMP threads that wait for a core another process holds stall every
    step (measured on 2 cores: 0.7 s epochs idle, 15-20 s with one busy neighbour), so one core is
    left to the rest of the machine.
    """
    if requested:
        return requested
    if config["device"] != "cpu":
        return torch.get_num_threads()
    if config["model"] in ("softmax", "scratch"):
        return 1
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) for the block only (main() may run inside a larger program)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StopFlag:
    """Set by the first Ctrl-C; the loop checks it between steps. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextmanager
    def catching_sigint(self) -> Iterator["StopFlag"]:
        def handler(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print(
                "\nCtrl-C: stopping after this step to save a checkpoint "
                "(press again to abort without saving)",
                file=sys.stderr,
            )

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no signal handling
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

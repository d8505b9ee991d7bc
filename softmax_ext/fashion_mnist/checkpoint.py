"""Writing the run's state and metrics atomically, and reading them back for --resume.

Every file is written to a temporary name in the same folder and then moved over the old one with
os.replace, so an interrupted write never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(state: dict, out_dir: Path) -> Path:
    """torch.save ``state`` to ``out_dir/checkpoint.pt`` atomically; return the path."""
    path = Path(out_dir) / CHECKPOINT
    _atomic(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(out_dir: Path, device: torch.device) -> dict:
    """The state saved by :func:`save_checkpoint`, tensors mapped to ``device``.

    Raises FileNotFoundError with a hint when there is none.
    """
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint at {path}; run without --resume to start a new run there"
        )
    return torch.load(path, map_location=device, weights_only=True)


def write_metrics(config: dict, epochs: list, out_dir: Path, **extra: Any) -> Path:
    """metrics.json: the config, one record per epoch and the training time, atomically."""
    metrics = {
        "config": config,
        "epochs": epochs,
        "train_seconds": round(sum(e["seconds"] for e in epochs), 4),
        **extra,
    }
    path = Path(out_dir) / METRICS
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    return path

"""Trainer benchmark: wall time of 10 Fashion-MNIST epochs, the chapter's recipe vs this project's.

Runs, each in its own process so none inherits another's warm caches or threads:

* d2l: the chapter's DataLoader recipe (:mod:`benchmarks.d2l_recipe`);
* fused: ``python -m softmax_ext.train --loss fused`` (softmax_ext's cross-entropy);
* torch: ``python -m softmax_ext.train --loss torch`` (same trainer, PyTorch's loss).

Each writes metrics.json with "train_seconds" (its own timing of the epochs); the benchmark adds
the whole process's wall time and writes trainer.json into the results folder.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import report
from .device import REPO, machine_info

RUNS = ("d2l", "fused", "torch")


def command(name: str, out: Path, epochs: int, data_dir: str, device: torch.device) -> List[str]:
    """The command line of trainer run ``name``."""
    dev = device.type
    if name == "d2l":
        return [
            sys.executable,
            "-m",
            "benchmarks.d2l_recipe",
            "--out",
            str(out),
            "--epochs",
            str(epochs),
            "--data-dir",
            data_dir,
            "--device",
            dev,
        ]
    if name in ("fused", "torch"):
        return [
            sys.executable,
            "-m",
            "softmax_ext.train",
            "--loss",
            name,
            "--out",
            str(out),
            "--epochs",
            str(epochs),
            "--data-dir",
            data_dir,
            "--device",
            dev,
        ]
    raise ValueError(f"unknown trainer run {name!r}; choose from {', '.join(RUNS)}")


def run_one(
    name: str, epochs: int, data_dir: str, device: torch.device, timeout_s: float, workdir: Path
) -> dict:
    """Run one trainer in a subprocess; its metrics plus wall time (or the error)."""
    out = workdir / name
    cmd = command(name, out, epochs, data_dir, device)
    label = {
        "d2l": "d2l recipe (DataLoader, torch loss)",
        "fused": "softmax_ext.train --loss fused",
        "torch": "softmax_ext.train --loss torch",
    }[name]
    result = {"name": label, "run": name, "command": " ".join(cmd[1:]), "epochs": epochs}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    print(f"trainer: {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        result["error"] = f"timed out after {timeout_s:.0f} s"
        return result
    result["wall_seconds"] = round(time.perf_counter() - t0, 3)
    result["returncode"] = proc.returncode
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        result["error"] = f"exit {proc.returncode}: " + " / ".join(tail)[-500:]
        return result
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError) as err:
        result["error"] = f"no readable metrics.json: {err}"
        return result
    result["train_seconds"] = metrics.get("train_seconds")
    history = metrics.get("epochs") or []
    if history:
        result["test_acc"] = history[-1].get("test_acc")
        result["epochs"] = len(history)
    return result


def _merge(trials: List[dict]) -> dict:
    """Several trials of one run: the median times, all times kept."""
    ok = [t for t in trials if "error" not in t]
    if not ok:
        return trials[-1]
    merged = dict(ok[0])
    for key in ("train_seconds", "wall_seconds"):
        values = [t[key] for t in ok if t.get(key) is not None]
        if values:
            merged[key] = statistics.median(values)
            merged[key + "_all"] = values
    merged["trials"] = len(ok)
    return merged


def run_trainers(
    folder: Path,
    device: torch.device,
    epochs: int = 10,
    data_dir: str = "data",
    runs: Sequence[str] = RUNS,
    timeout_s: float = 3600.0,
    reps: int = 1,
    workdir: Optional[Path] = None,
) -> int:
    """Run the selected trainers (``reps`` rounds, interleaved), write trainer.json and
    results.md into ``folder``; return 0 when every run succeeded, else 1."""
    for name in runs:
        command(name, Path("."), epochs, data_dir, device)  # reject unknown names up front
    with tempfile.TemporaryDirectory(prefix="softmax_ext_trainer_") as tmp:
        base = Path(workdir) if workdir else Path(tmp)
        trials = {name: [] for name in runs}
        for _ in range(reps):
            for name in runs:
                trials[name].append(run_one(name, epochs, data_dir, device, timeout_s, base))
    results = [_merge(trials[name]) for name in runs]
    machine = machine_info(device)
    doc = {"machine": machine, "date": machine["date"], "epochs": epochs, "runs": results}
    path = report.write_json(doc, Path(folder) / report.TRAINER)
    report.write_markdown(Path(folder))
    for line in report.trainer_section(doc):
        print(line)
    print(f"\nwrote {path}")
    return 0 if all("error" not in r for r in results) else 1

"""The fused loss against PyTorch's in the Fashion-MNIST trainer: one process, alternating epochs.

Whole trainer processes vary by +-15 % on a shared 2-core VM, more than the difference being
measured; so this builds the chapter's recipe twice in one process (same seed, same data, one
thread as the trainer uses), one trainer with ``softmax_ext.CrossEntropyLoss`` and one with
``torch.nn.CrossEntropyLoss``, and alternates their epochs: ``fused`` then ``torch``, then the other
order, ``--epochs`` times each. Reports the median epoch time of each and their ratio (the issue's
goal: fused / torch <= 1.05), and writes ``loss_in_trainer.json`` into the results folder.

    python -m benchmarks.loss_in_trainer [--epochs 10] [--data-dir data] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from softmax_ext.fashion_mnist import data as fm_data
from softmax_ext.fashion_mnist.loop import Trainer
from softmax_ext.fashion_mnist.recipe import build

from .cli import RESULTS_ROOT
from .device import machine_info, slug

RECIPE = {
    "model": "softmax",
    "hidden": None,
    "loss": "fused",
    "backend": "auto",
    "label_smoothing": 0.0,
    "optimizer": "sgd",
    "lr": 0.1,
    "seed": 0,
}


def make_trainer(loss: str, ds: fm_data.FashionMNISTTensors) -> Trainer:
    """The chapter's recipe with ``loss`` ("fused" or "torch"), seeded identically."""
    model, loss_fn, opt = build({**RECIPE, "loss": loss}, torch.device("cpu"))
    return Trainer(
        model, loss_fn, opt, ds.train_x, ds.train_y, ds.test_x, ds.test_y, batch_size=256, seed=0
    )


def measure(epochs: int, data_dir: str) -> dict:
    """Median seconds per epoch of both trainers, epochs alternating (order swapped each round)."""
    ds = fm_data.load(data_dir, "cpu")
    trainers = {"fused": make_trainer("fused", ds), "torch": make_trainer("torch", ds)}
    seconds: dict = {name: [] for name in trainers}
    accs: dict = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for e in range(epochs):
            order = ("fused", "torch") if e % 2 == 0 else ("torch", "fused")
            for name in order:
                t = trainers[name]
                t.run(e + 1, on_epoch=lambda rec: None)
                seconds[name].append(t.progress.history[-1]["seconds"])
                accs[name] = t.progress.history[-1]["test_acc"]
    finally:
        torch.set_num_threads(previous)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    same = all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(
            trainers["fused"].model.parameters(),
            trainers["torch"].model.parameters(),
            strict=True,
        )
    )
    return {
        "epochs": epochs,
        "seconds": seconds,
        "median_s": med,
        "ratio_fused_over_torch": med["fused"] / med["torch"],
        "goal": 1.05,
        "test_acc": accs,
        "same_parameters": same,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default=None, help="results folder (default: results/<device>)")
    args = ap.parse_args(argv)
    result = measure(args.epochs, args.data_dir)
    machine = machine_info(torch.device("cpu"))
    out = Path(args.out) if args.out else RESULTS_ROOT / slug(torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "loss_in_trainer.json"
    path.write_text(json.dumps({"machine": machine, **result}, indent=1) + "\n")
    m = result["median_s"]
    print(
        f"epoch medians: fused {m['fused']:.3f} s, torch {m['torch']:.3f} s; "
        f"fused / torch = {result['ratio_fused_over_torch']:.3f} (goal <= 1.05); "
        f"same parameters: {result['same_parameters']}; wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

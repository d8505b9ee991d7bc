"""The D2L chapter's softmax regression recipe, as the baseline of the trainer benchmark.

``python -m benchmarks.d2l_recipe --out DIR`` trains the concise softmax regression of "Dive into
Deep Learning" chapter 3 the way the chapter does: torchvision's FashionMNIST with
``transforms.ToTensor()``, a shuffled ``DataLoader`` of batch 256 with 4 worker processes (the
chapter's ``get_dataloader_workers()``), ``Flatten + Linear(784, 10)`` initialised N(0, 0.01),
``CrossEntropyLoss(reduction='none')`` with ``l.mean().backward()``, SGD with lr 0.1, 10 epochs,
per-batch accuracy bookkeeping with ``float(...)`` and a test-set evaluation after each epoch.
Only the plotting is left out. It writes metrics.json with "train_seconds" (the sum of the epochs,
each timed from its first batch through its test evaluation), like ``python -m softmax_ext.train``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

BATCH_SIZE = 256
NUM_WORKERS = 4
LR = 0.1


def data_loaders(data_dir: str, batch_size: int, num_workers: int) -> tuple:
    """(train, test) DataLoaders over torchvision's FashionMNIST with ToTensor, as the chapter.

    The data are found (folder, $FASHION_MNIST_DIR or Debian's package) and laid out for
    torchvision by softmax_ext.fashion_mnist.data, so no download is needed where a copy exists.
    """
    from torch.utils import data
    from torchvision import datasets, transforms

    from softmax_ext.fashion_mnist.data import locate

    root, _origin = locate(data_dir)
    trans = transforms.ToTensor()
    train = datasets.FashionMNIST(str(root), train=True, transform=trans, download=False)
    test = datasets.FashionMNIST(str(root), train=False, transform=trans, download=False)
    return (
        data.DataLoader(train, batch_size, shuffle=True, num_workers=num_workers),
        data.DataLoader(test, batch_size, shuffle=False, num_workers=num_workers),
    )


def correct(y_hat: torch.Tensor, y: torch.Tensor) -> float:
    """Number of correct predictions (the chapter's ``accuracy``)."""
    return float((y_hat.argmax(dim=1).type(y.dtype) == y).type(y.dtype).sum())


def evaluate(net: nn.Module, loader, device: torch.device) -> float:
    """Test accuracy over a DataLoader (the chapter's ``evaluate_accuracy``)."""
    net.eval()
    hits, seen = 0.0, 0
    with torch.no_grad():
        for X, y in loader:
            X, y = X.to(device), y.to(device)
            hits += correct(net(X), y)
            seen += y.numel()
    return hits / seen


def train(
    data_dir: str, epochs: int, device: torch.device, num_workers: int, seed: int = 0
) -> dict:
    """Train as the chapter does; return metrics (per-epoch records and train_seconds)."""
    torch.manual_seed(seed)
    train_iter, test_iter = data_loaders(data_dir, BATCH_SIZE, num_workers)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def init_weights(m: nn.Module) -> None:
        if type(m) is nn.Linear:
            nn.init.normal_(m.weight, std=0.01)

    net.apply(init_weights)
    net.to(device)
    loss = nn.CrossEntropyLoss(reduction="none")
    trainer = torch.optim.SGD(net.parameters(), lr=LR)
    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        net.train()
        loss_sum, hits, seen = 0.0, 0.0, 0
        for X, y in train_iter:
            X, y = X.to(device), y.to(device)
            y_hat = net(X)
            l = loss(y_hat, y)
            trainer.zero_grad()
            l.mean().backward()
            trainer.step()
            loss_sum += float(l.sum())
            hits += correct(y_hat, y)
            seen += y.numel()
        test_acc = evaluate(net, test_iter, device)
        seconds = time.perf_counter() - start
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_acc": hits / seen,
                "test_acc": test_acc,
                "seconds": seconds,
            }
        )
        print(
            f"epoch {epoch + 1}, loss {loss_sum / seen:.4f}, train acc {hits / seen:.3f}, "
            f"test acc {test_acc:.3f}  ({seconds:.2f} s)",
            flush=True,
        )
    return {
        "config": {
            "recipe": "d2l chapter 3 (DataLoader + ToTensor)",
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "num_workers": num_workers,
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
        "epochs": history,
        "train_seconds": round(sum(e["seconds"] for e in history), 4),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: --out DIR [--epochs 10] [--data-dir data] [--device cpu]."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.d2l_recipe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-workers", type=int, default=NUM_WORKERS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    metrics = train(
        args.data_dir, args.epochs, torch.device(args.device), args.num_workers, args.seed
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"train_seconds {metrics['train_seconds']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

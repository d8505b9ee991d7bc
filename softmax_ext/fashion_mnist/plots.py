"""The run's figures: learning curves, labelled test predictions and the confusion matrix.

matplotlib draws with the Agg backend (files only, no screen needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from .data import CLASS_NAMES  # noqa: E402
from .loop import predict  # noqa: E402
from .models import predict_probabilities  # noqa: E402


def _save(fig: "plt.Figure", path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(epochs: Sequence[dict], path: Path) -> Path:
    """Train loss, train accuracy and test accuracy per epoch on one axis, as the chapter shows."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [e["epoch"] for e in epochs]
    ax.plot(xs, [e["train_loss"] for e in epochs], "-", label="train loss")
    ax.plot(xs, [e["train_acc"] for e in epochs], "m--", label="train acc")
    ax.plot(xs, [e["test_acc"] for e in epochs], "g-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(xs[-1], 2))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_predictions(
    images: Tensor,
    true: Tensor,
    pred: Tensor,
    confidence: Tensor,
    class_names: Sequence[str],
    path: Path,
    cols: int = 8,
) -> Path:
    """A grid of test images titled "true / predicted (probability)"; mistakes in red.

    The grid is one mosaic image on one axes (a subplot per image is ten times slower to draw).
    """
    n = len(images)
    rows = -(-n // cols)
    cell_w, cell_h, top = 36, 52, 21  # pixels per cell; the title sits in the top part
    mosaic = np.zeros((rows * cell_h, cols * cell_w), dtype=np.float32)
    pixels = images.reshape(n, 28, 28).float().cpu().numpy()
    width = 1.45 * cols
    fig, ax = plt.subplots(figsize=(width, width * rows * cell_h / (cols * cell_w) + 0.4))
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = r * cell_h + top, c * cell_w + 4
        mosaic[y0 : y0 + 28, x0 : x0 + 28] = pixels[i]
        t, p = int(true[i]), int(pred[i])
        ax.text(
            x0 + 14,
            y0 - 2,
            f"{class_names[t]}\n{class_names[p]} ({float(confidence[i]):.0%})",
            ha="center",
            va="bottom",
            fontsize=7.5,
            color="black" if t == p else "red",
        )
    ax.imshow(mosaic, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    ax.set_title("test images: true label / predicted label (probability)", fontsize=9)
    return _save(fig, path)


def confusion_matrix(true: Tensor, pred: Tensor, num_classes: int) -> Tensor:
    """counts[t, p] = how many examples of class t were predicted as p."""
    flat = true.to(torch.int64) * num_classes + pred.to(torch.int64)
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def plot_confusion(counts: Tensor, class_names: Sequence[str], path: Path) -> Path:
    """The confusion matrix with counts in the cells, rows = true class, columns = predicted."""
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(counts.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = int(counts.max()) or 1
    for t in range(k):
        for p in range(k):
            c = int(counts[t, p])
            ax.text(
                p,
                t,
                str(c),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if c > top / 2 else "black",
            )
    acc = float(counts.diagonal().sum()) / max(int(counts.sum()), 1)
    ax.set_title(f"confusion matrix on the test set (accuracy {acc:.3f})")
    return _save(fig, path)


def write_figures(
    model: nn.Module,
    test_x: Tensor,
    test_y: Tensor,
    history: Sequence[dict],
    backend: str,
    out: Path,
    n_examples: int = 24,
) -> None:
    """curves.png, predictions.png and confusion.png of a trained model in ``out``."""
    if history:
        plot_curves(history, out / "curves.png")
    pred = predict(model, test_x)
    with torch.inference_mode():
        probs = predict_probabilities(model, test_x[:n_examples], backend)
    confidence = probs.gather(1, pred[:n_examples, None]).squeeze(1)
    plot_predictions(
        test_x[:n_examples],
        test_y[:n_examples],
        pred[:n_examples],
        confidence,
        CLASS_NAMES,
        out / "predictions.png",
    )
    plot_confusion(
        confusion_matrix(test_y, pred, len(CLASS_NAMES)), CLASS_NAMES, out / "confusion.png"
    )

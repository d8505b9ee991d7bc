"""The training loop of chapter 3's ``train_ch3``, on data held as tensors on the device.

Per epoch: a seeded random permutation of the training set, minibatches gathered by index, one
optimizer step per minibatch, then test accuracy in large batches. Loss and accuracy sums stay on
the device during the epoch (no per-batch ``.item()`` synchronisation).

The loop can stop between two steps (Ctrl-C) and later continue exactly where it stopped: the
permutation of epoch e depends only on (seed, e), and the partial sums are part of the state.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

EVAL_BATCH = 10_000


@dataclass
class Progress:
    """Where training stands: the epoch under way (= epochs done), its next step, partial sums."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The permutation of the n training examples for ``epoch``: a function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).to(device)


@torch.inference_mode()
def predict(model: nn.Module, x: Tensor, batch_size: int = EVAL_BATCH) -> Tensor:
    """Predicted class of every row of ``x``, evaluated in large batches."""
    was_training = model.training
    model.eval()
    labels = torch.cat(
        [model(x[i : i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)]
    )
    model.train(was_training)
    return labels


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return (predict(model, x) == y).sum().item() / len(y)


class Trainer:
    """Runs epochs of minibatch training and reports each finished epoch.

    Args:
        model, loss, optimizer: what to train, the mean loss of (logits, labels) (None: the
            model computes it, see models.FusedHeadModel), the updater.
        train_x, train_y, test_x, test_y: the data set on the training device.
        batch_size, seed: minibatch size; seed of the per-epoch permutations.
        progress: where to start (a fresh run or a checkpoint's state).
        lr_at: optional learning rate of each epoch (0-based index), set before the epoch runs;
            a function of the index alone, so a resumed run gets the same rates.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Optional[nn.Module],
        optimizer: torch.optim.Optimizer,
        train_x: Tensor,
        train_y: Tensor,
        test_x: Tensor,
        test_y: Tensor,
        batch_size: int,
        seed: int,
        progress: Optional[Progress] = None,
        lr_at: Optional[Callable[[int], float]] = None,
    ) -> None:
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self.batch_size, self.seed = batch_size, seed
        self.progress = progress or Progress()
        self.lr_at = lr_at

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.train_x) // self.batch_size)

    def run(
        self,
        epochs: int,
        on_epoch: Callable[[dict], None],
        should_stop: Callable[[], bool] = lambda: False,
        progress_bar: Callable = lambda it, **kw: it,
    ) -> bool:
        """Train until ``epochs`` epochs are done; return False if ``should_stop`` ended it early.

        ``on_epoch`` gets each finished epoch's record {"epoch", "train_loss", "train_acc",
        "test_acc", "seconds"}; ``progress_bar`` wraps the step iterator (e.g. tqdm).
        """
        while self.progress.epoch < epochs:
            if not self._epoch(should_stop, progress_bar):
                return False
            on_epoch(self.progress.history[-1])
        return True

    def _epoch(self, should_stop: Callable[[], bool], progress_bar: Callable) -> bool:
        p, bs, device = self.progress, self.batch_size, self.train_x.device
        model, loss_fn, opt = self.model, self.loss, self.optimizer
        x, y = self.train_x, self.train_y
        start = time.perf_counter()
        if self.lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = self.lr_at(p.epoch)
        order = epoch_order(len(x), self.seed, p.epoch, device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, step = 0, p.step
        model.train()
        steps = progress_bar(
            range(p.step, self.steps_per_epoch),
            initial=p.step,
            total=self.steps_per_epoch,
            desc=f"epoch {p.epoch + 1}",
        )
        stopped = False
        for step in steps:
            if should_stop():
                stopped = True
                break
            idx = order[step * bs : (step + 1) * bs]
            X, Y = x.index_select(0, idx), y.index_select(0, idx)
            if loss_fn is None:  # the model's output layer is its loss (--loss fused-linear)
                l, logits = model.loss_and_logits(X, Y)
            else:
                logits = model(X)
                l = loss_fn(logits, Y)
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
            n = len(idx)
            loss_sum.add_(l.detach(), alpha=n)
            correct.add_((logits.detach().argmax(dim=1) == Y).sum())
            seen += n
        else:
            step = self.steps_per_epoch
        if hasattr(steps, "close"):
            steps.close()
        p.loss_sum += loss_sum.item()
        p.correct += int(correct.item())
        p.seen += seen
        p.step = step
        if stopped:
            p.seconds += time.perf_counter() - start
            return False
        test_acc = accuracy(model, self.test_x, self.test_y)
        p.seconds += time.perf_counter() - start
        p.history.append(
            {
                "epoch": p.epoch + 1,
                "train_loss": p.loss_sum / p.seen,
                "train_acc": p.correct / p.seen,
                "test_acc": test_acc,
                "seconds": p.seconds,
            }
        )
        self.progress = Progress(epoch=p.epoch + 1, history=p.history)
        return True

    def state_dict(self) -> dict:
        """Model, optimizer and progress, for a checkpoint."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": asdict(self.progress),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])

"""``softmax-ext-train`` / ``python -m softmax_ext.train``: chapter 3's softmax regression on
Fashion-MNIST, trained with softmax_ext's fused cross-entropy.

The defaults are the chapter's recipe (softmax regression, SGD with lr 0.1, batch size 256,
10 epochs). Outputs go to ``--out``: metrics.json, curves.png, predictions.png, confusion.png and
checkpoint.pt (written atomically after every epoch and on Ctrl-C; ``--resume`` continues it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import checkpoint as ckpt
from .data import DataError, load
from .loop import Progress, Trainer
from .losses import LOSSES
from .models import MODELS, parse_hidden
from .recipe import DEFAULT_EPOCHS, DEFAULT_LR, RUN_DEFINING, build, lr_schedule, make_config
from .runtime import StopFlag, num_threads, resolve_device, threads_for


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; defaults are the chapter's recipe."""
    ap = argparse.ArgumentParser(
        prog="softmax-ext-train",
        allow_abbrev=False,
        description="Softmax regression (d2l chapter 3) on Fashion-MNIST with softmax_ext's fused "
        "cross-entropy loss. Defaults are the chapter's recipe.",
    )
    ap.add_argument(
        "--model",
        choices=MODELS,
        default="softmax",
        help="softmax: Flatten + Linear(784, 10); scratch: explicit W and b; "
        "mlp: ReLU MLP (default: %(default)s)",
    )
    ap.add_argument(
        "--hidden",
        default="256",
        help="MLP hidden sizes, e.g. 256 or 200,200 (default: %(default)s)",
    )
    ap.add_argument(
        "--loss",
        choices=LOSSES,
        default="fused",
        help="fused: softmax_ext.CrossEntropyLoss; torch: torch.nn.CrossEntropyLoss; "
        "fused-linear: the output layer and the loss as one softmax_ext.LinearCrossEntropyLoss "
        "(softmax and mlp models) (default: %(default)s)",
    )
    ap.add_argument(
        "--backend",
        choices=("auto", "cpp", "triton", "torch"),
        default="auto",
        help="softmax_ext backend of the fused loss; auto: C++ on CPU, Triton on "
        "CUDA (default: %(default)s)",
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"number of epochs (default: {DEFAULT_EPOCHS}; with --resume: the checkpoint's)",
    )
    ap.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: 0.1 for sgd, 0.001 for adam)",
    )
    ap.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="cosine: decay the learning rate per epoch from --lr towards 0 (default: %(default)s)",
    )
    ap.add_argument(
        "--optimizer", choices=tuple(DEFAULT_LR), default="sgd", help="(default: %(default)s)"
    )
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="(default: %(default)s)")
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the initial weights and the per-epoch shuffles (default: %(default)s)",
    )
    ap.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when present, else CPU (default: %(default)s)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 for softmax/scratch, all cores but one for mlp)",
    )
    ap.add_argument(
        "--data-dir",
        default="data",
        help="where to look for Fashion-MNIST first, then $FASHION_MNIST_DIR, then "
        "Debian's dataset-fashion-mnist; where to prepare or download it "
        "(default: %(default)s)",
    )
    ap.add_argument(
        "--out", default="runs/fashion_mnist", help="output folder (default: %(default)s)"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in OUT/checkpoint.pt with its settings",
    )
    args = ap.parse_args(argv)
    if args.epochs is not None and args.epochs < 0:
        ap.error("--epochs must be >= 0")
    if args.batch_size <= 0:
        ap.error("--batch-size must be positive")
    if not 0.0 <= args.label_smoothing <= 1.0:
        ap.error("--label-smoothing must be in [0, 1]")
    try:
        parse_hidden(args.hidden)
    except ValueError as err:
        ap.error(str(err))
    return args


def _options_given(argv: Sequence[str]) -> set:
    """Config keys of the options present on the command line ("--batch-size" -> "batch_size")."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def _tqdm(iterable, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, unit="batch", dynamic_ncols=True, disable=None, **kwargs)


def epoch_line(e: dict) -> str:
    """The chapter-style summary of one epoch."""
    return (
        f"epoch {e['epoch']}, loss {e['train_loss']:.4f}, train acc {e['train_acc']:.3f}, "
        f"test acc {e['test_acc']:.3f}  ({e['seconds']:.2f} s)"
    )


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    out = Path(args.out)
    config = make_config(args, device)
    state = None
    if args.resume:
        try:
            state = ckpt.load_checkpoint(out, device)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        given = _options_given(sys.argv[1:] if argv is None else argv)
        ignored = [
            f"--{k.replace('_', '-')}"
            for k in RUN_DEFINING
            if k in given and config[k] != state["config"][k]
        ]
        if ignored:
            print(
                f"note: --resume keeps the checkpoint's settings; ignoring {', '.join(ignored)}",
                file=sys.stderr,
            )
        config.update({k: state["config"][k] for k in RUN_DEFINING})
        config["epochs"] = state["config"]["epochs"] if args.epochs is None else args.epochs
    config["threads"] = threads_for(config, args.threads)
    try:
        data = load(args.data_dir, device)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"Fashion-MNIST from {data.origin}: {len(data.train_x)} training and "
        f"{len(data.test_x)} test images on {device}"
    )
    with num_threads(config["threads"]):
        return _train(config, data, state, out, device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the trainer; return the process exit status (0, or 130 after Ctrl-C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # outside the training loop: nothing unsaved is lost
        print("\ninterrupted", file=sys.stderr)
        return 130


def _train(config: dict, data, state: Optional[dict], out: Path, device: torch.device) -> int:
    model, loss, optimizer = build(config, device)
    trainer = Trainer(
        model,
        loss,
        optimizer,
        data.train_x,
        data.train_y,
        data.test_x,
        data.test_y,
        config["batch_size"],
        config["seed"],
        Progress(),
        lr_schedule(config),
    )
    if state is not None:
        trainer.load_state_dict(state)
        p = trainer.progress
        where = (
            f"epoch {p.epoch + 1}, step {p.step}"
            if p.epoch < config["epochs"]
            else "all epochs done, redrawing the figures"
        )
        print(
            f"resuming {out / ckpt.CHECKPOINT}: {where} (settings from the checkpoint, "
            f"{config['epochs']} epochs)"
        )
        for e in p.history:
            print(epoch_line(e))

    def save() -> None:
        ckpt.save_checkpoint({"config": config, **trainer.state_dict()}, out)
        ckpt.write_metrics(config, trainer.progress.history, out, data=data.origin)

    def on_epoch(e: dict) -> None:
        print(epoch_line(e), flush=True)
        save()

    flag = StopFlag()
    with flag.catching_sigint():
        finished = trainer.run(config["epochs"], on_epoch, flag, _tqdm)
    save()
    if not finished:
        print(
            f"interrupted: saved {out / ckpt.CHECKPOINT}; continue with the same command "
            "and --resume",
            file=sys.stderr,
        )
        return 130
    from .plots import write_figures  # matplotlib takes ~1 s to load: only when it is needed

    write_figures(
        trainer.model,
        trainer.test_x,
        trainer.test_y,
        trainer.progress.history,
        config["backend"] if config["loss"] != "torch" else "torch",
        out,
    )
    seconds = sum(e["seconds"] for e in trainer.progress.history)
    print(
        f"train_seconds {seconds:.2f} ({config['model']}, loss {config['loss']}, {device}, "
        f"{config['threads']} thread{'s' if config['threads'] > 1 else ''}); outputs in {out}/"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

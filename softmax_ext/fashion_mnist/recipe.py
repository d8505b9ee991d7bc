"""A run's recipe: its settings (the config dict) and the model, loss, optimizer and learning-rate
schedule they make. The defaults are the chapter's recipe."""

from __future__ import annotations

import argparse
import math
import platform
from typing import Callable, Optional

import torch

from .losses import build_loss
from .models import build_fused_head_model, build_model, parse_hidden

DEFAULT_LR = {"sgd": 0.1, "adam": 0.001}
DEFAULT_EPOCHS = 10
# What --resume takes from the checkpoint rather than from the command line.
RUN_DEFINING = (
    "model",
    "hidden",
    "loss",
    "backend",
    "batch_size",
    "lr",
    "lr_schedule",
    "optimizer",
    "label_smoothing",
    "seed",
)


def make_config(args: argparse.Namespace, device: torch.device) -> dict:
    """The run's configuration as recorded in metrics.json and the checkpoint."""
    return {
        "model": args.model,
        "hidden": list(parse_hidden(args.hidden)) if args.model == "mlp" else None,
        "loss": args.loss,
        "backend": args.backend,
        "epochs": DEFAULT_EPOCHS if args.epochs is None else args.epochs,
        "batch_size": args.batch_size,
        "lr": DEFAULT_LR[args.optimizer] if args.lr is None else args.lr,
        "lr_schedule": args.lr_schedule,
        "optimizer": args.optimizer,
        "label_smoothing": args.label_smoothing,
        "seed": args.seed,
        "device": str(device),
        "threads": args.threads,
        "torch": str(torch.__version__),
        "cpu": platform.processor() or platform.machine(),
    }


def build(config: dict, device: torch.device) -> tuple:
    """Seeded model, loss and optimizer for ``config``."""
    torch.manual_seed(config["seed"])
    backend = config["backend"] if config["loss"] != "torch" else "torch"
    hidden = tuple(config["hidden"] or (256,))
    if config["loss"] == "fused-linear":  # the model's output layer is the loss: no loss module
        model = build_fused_head_model(
            config["model"], hidden, config["label_smoothing"], backend
        ).to(device)
        loss = None
    else:
        model = build_model(config["model"], hidden, backend).to(device)
        loss = build_loss(
            config["loss"], config["model"], config["label_smoothing"], config["backend"]
        )
    if config["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    else:  # the fused Adam step is a third of the default's cost for these small tensors
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], fused=True)
    return model, loss, optimizer


def lr_schedule(config: dict) -> Optional[Callable[[int], float]]:
    """The learning rate of each epoch (0-based), or None for a constant rate."""
    if config["lr_schedule"] == "constant":
        return None
    lr, epochs = config["lr"], max(config["epochs"], 1)
    return lambda epoch: lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))

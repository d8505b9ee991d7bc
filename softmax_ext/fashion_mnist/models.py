"""The models of "Dive into Deep Learning" chapters 3 and 4, for 28x28 images and 10 classes.

* ``softmax``: nn.Flatten + nn.Linear(784, 10), the concise softmax regression (3.7);
* ``scratch``: explicit W and b, the softmax regression from scratch (3.6);
* ``mlp``: a ReLU multilayer perceptron (4.3), 784-256-10 by default.

With ``--loss fused-linear`` the last linear layer and the loss are one
``softmax_ext.LinearCrossEntropyLoss`` (:class:`FusedHeadModel`): the softmax regression is then
that module alone (784 -> 10), the MLP its hidden layers plus that module.

All start from the chapters' initialisation: weights from N(0, 0.01^2), biases zero.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .. import functional as SF
from ..nn import LinearCrossEntropyLoss

NUM_INPUTS, NUM_OUTPUTS = 28 * 28, 10
MODELS = ("softmax", "scratch", "mlp")


def init_weights(module: nn.Module) -> None:
    """The chapters' ``init_weights``: normal weights with std 0.01 (and zero biases)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.01)
        nn.init.zeros_(module.bias)


class SoftmaxRegressionScratch(nn.Module):
    """Softmax regression from scratch: O = X W + b, probabilities softmax(O).

    ``forward`` returns the logits O; the loss takes their log-softmax (the chapter's
    -log(softmax(O)[y]) without its overflow) and :meth:`probabilities` gives softmax(O).
    """

    def __init__(
        self, num_inputs: int = NUM_INPUTS, num_outputs: int = NUM_OUTPUTS, backend: str = "auto"
    ) -> None:
        super().__init__()
        # W is (784, 10) as in the chapter but stored transposed, as nn.Linear stores its weight:
        # X @ W then takes BLAS's fast path (here twice as fast as with a row-major 784 x 10 W).
        self.W = nn.Parameter(torch.normal(0.0, 0.01, size=(num_outputs, num_inputs)).t())
        self.b = nn.Parameter(torch.zeros(num_outputs))
        self.backend = backend

    def forward(self, X: Tensor) -> Tensor:
        return torch.matmul(X.reshape((-1, self.W.shape[0])), self.W) + self.b

    def probabilities(self, X: Tensor) -> Tensor:
        """softmax(X W + b) by softmax_ext's kernel (torch's for backend="torch")."""
        return SF.softmax(self(X), dim=1, backend=self.backend)


def parse_hidden(spec: str) -> tuple:
    """'256' -> (256,), '200,200' -> (200, 200)."""
    try:
        sizes = tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise ValueError(
            f"hidden sizes must be positive integers like 256 or 200,200, got {spec!r}"
        )
    return sizes


class FusedHeadModel(nn.Module):
    """A model whose output layer is a ``LinearCrossEntropyLoss``: ``body`` (flatten, hidden
    layers) gives features, the head's projection gives the logits (``forward``, for predictions)
    and :meth:`loss_and_logits` the training loss without materialising logits for the loss."""

    def __init__(self, body: nn.Module, head: LinearCrossEntropyLoss) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, X: Tensor) -> Tensor:
        return self.head.linear(self.body(X))

    def loss_and_logits(self, X: Tensor, y: Tensor) -> tuple:
        """(mean loss, detached logits for the accuracy) of a batch."""
        features = self.body(X)
        loss = self.head(features, y)
        with torch.no_grad():
            logits = self.head.linear(features)
        return loss, logits


def build_fused_head_model(
    name: str, hidden: Sequence[int] = (256,), label_smoothing: float = 0.0, backend: str = "auto"
) -> FusedHeadModel:
    """``name`` ("softmax" or "mlp") with its output layer fused into the loss, initialised as
    the chapters do; seed torch first."""
    if name not in ("softmax", "mlp"):
        raise ValueError(f"--loss fused-linear trains the softmax and mlp models, not {name!r}")
    layers: list = [nn.Flatten()]
    width = NUM_INPUTS
    for h in hidden if name == "mlp" else ():
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    head = LinearCrossEntropyLoss(
        width, NUM_OUTPUTS, bias=True, label_smoothing=label_smoothing, backend=backend
    )
    model = FusedHeadModel(nn.Sequential(*layers), head)
    model.apply(init_weights)
    return model


def build_model(name: str, hidden: Sequence[int] = (256,), backend: str = "auto") -> nn.Module:
    """A freshly initialised model by name (see the module docstring); seed torch first."""
    if name == "softmax":
        net = nn.Sequential(nn.Flatten(), nn.Linear(NUM_INPUTS, NUM_OUTPUTS))
    elif name == "scratch":
        return SoftmaxRegressionScratch(backend=backend)
    elif name == "mlp":
        layers: list = [nn.Flatten()]
        width = NUM_INPUTS
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        net = nn.Sequential(*layers, nn.Linear(width, NUM_OUTPUTS))
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    net.apply(init_weights)
    return net


def predict_probabilities(model: nn.Module, X: Tensor, backend: str = "auto") -> Tensor:
    """Class probabilities for a batch: softmax_ext.softmax of the model's logits."""
    if isinstance(model, SoftmaxRegressionScratch):
        return model.probabilities(X)
    return SF.softmax(model(X), dim=1, backend=backend)

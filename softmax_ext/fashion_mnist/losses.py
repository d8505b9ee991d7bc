"""The training losses: softmax_ext's fused cross-entropy or PyTorch's, side by side.

The concise models use ``softmax_ext.CrossEntropyLoss`` (``--loss fused``) or
``torch.nn.CrossEntropyLoss`` (``--loss torch``). The from-scratch model writes the loss on top
of ``log_softmax`` (softmax_ext's or torch's), as chapter 3.6 does. With ``--loss fused-linear``
the model owns its loss (``models.FusedHeadModel``) and there is no separate loss module.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .. import functional as SF
from ..nn import CrossEntropyLoss

LOSSES = ("fused", "torch", "fused-linear")


class ScratchCrossEntropy(nn.Module):
    """-log p[y], averaged over the batch, with p = softmax(logits); optional label smoothing.

    The chapter's ``-torch.log(y_hat[range(len(y_hat)), y])`` on log-probabilities, so that large
    logits cannot overflow.
    """

    def __init__(self, fused: bool, label_smoothing: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        self.log_softmax = partial(SF.log_softmax, backend=backend) if fused else torch.log_softmax
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        log_p = self.log_softmax(logits, dim=1)
        nll = -log_p.gather(1, y.unsqueeze(1)).squeeze(1)  # = -log_p[range(len(y)), y]
        if self.label_smoothing > 0:
            eps = self.label_smoothing
            nll = (1 - eps) * nll - eps * log_p.mean(dim=1)
        return nll.mean()


def build_loss(
    kind: str, model_name: str, label_smoothing: float = 0.0, backend: str = "auto"
) -> nn.Module:
    """The mean cross-entropy to train ``model_name`` with: ``kind`` "fused" or "torch"."""
    if kind not in LOSSES or kind == "fused-linear":
        raise ValueError(f"loss must be one of {LOSSES[:2]}, got {kind!r}")
    if model_name == "scratch":
        return ScratchCrossEntropy(kind == "fused", label_smoothing, backend)
    if kind == "fused":
        return CrossEntropyLoss(label_smoothing=label_smoothing, backend=backend)
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)

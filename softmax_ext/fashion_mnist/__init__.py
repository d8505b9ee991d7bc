"""The Fashion-MNIST trainer: d2l chapter 3's softmax regression with softmax_ext's loss.

Modules, in the order data flows: ``data`` (find, verify, load), ``models`` and ``losses``,
``recipe`` (settings -> model, loss, optimizer, learning-rate schedule), ``loop`` (the training
loop), ``checkpoint`` (atomic checkpoint and metrics files), ``plots`` (figures), ``runtime``
(device, threads, Ctrl-C) and ``train`` (the command line, ``softmax-ext-train``).
"""

from .data import CLASS_NAMES, DataError, load

__all__ = ["CLASS_NAMES", "DataError", "load"]

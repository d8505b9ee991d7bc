"""``python -m softmax_ext.train``: the Fashion-MNIST trainer.

A thin wrapper of :func:`softmax_ext.fashion_mnist.train.main` (also the ``softmax-ext-train``
console script).
"""

from .fashion_mnist.train import main

if __name__ == "__main__":
    raise SystemExit(main())

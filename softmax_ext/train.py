"""``python -m softmax_ext.train``: the Fashion-MNIST trainer (see softmax_ext.fashion_mnist.train)."""
from .fashion_mnist.train import main

if __name__ == "__main__":
    raise SystemExit(main())

"""softmax_ext: fused, numerically stable softmax and softmax-cross-entropy kernels for PyTorch.

C++ kernels serve CPU tensors, Triton kernels CUDA tensors; both sit behind torch.library operators
whose autograd nodes are C++, one per operator. The public API mirrors PyTorch's names and
signatures.
"""

from . import _cpp
from . import ops as _ops  # defines the torch.library operators
from .functional import cross_entropy, linear_cross_entropy, log_softmax, softmax
from .nn import CrossEntropyLoss, LinearCrossEntropyLoss, LogSoftmax, Softmax, Softmax2d

# Register the CPU kernels now when the extension is built, so torch.ops.softmax_ext.* work at once
# (a missing build is JIT-compiled only when a CPU kernel is first needed), and resolve the backends
# so that a first call inside torch.compile finds them ready.
_ops.warm_backend_cache(_cpp.try_import_built())

empty_cache = _cpp.empty_cache

__all__ = [
    "empty_cache",
    "cross_entropy",
    "linear_cross_entropy",
    "softmax",
    "log_softmax",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "Softmax",
    "LogSoftmax",
    "Softmax2d",
]
__version__ = "0.1.0"

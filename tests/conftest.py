"""Shared fixtures. Parity tests take `backend` and `device`: SOFTMAX_EXT_TEST_BACKENDS (comma
separated, default "cpp") picks the backends; `make test-triton` sets it to "triton" under
TRITON_INTERPRET=1, so the same tests check the Triton kernels on CPU tensors."""

from __future__ import annotations

import os

import pytest
import torch

BACKENDS = [b for b in os.environ.get("SOFTMAX_EXT_TEST_BACKENDS", "cpp").split(",") if b]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device(backend: str) -> torch.device:
    """CUDA for the Triton backend when a GPU is present, else CPU (interpreter or C++)."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)

"""What a benchmark run measures: ops, directions, implementations, shapes, dtypes, repetitions.

The defaults depend on the device: a GPU gets language-model vocabularies up to 16384 x 131072, a
small CPU the shapes that finish in reasonable time (always including the core target 8192 x 32000).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

OPS = ("softmax", "log_softmax", "cross_entropy")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("softmax_ext", "torch", "torch.compile", "liger")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {
    "fp32": "float32",
    "float32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}

Shape = tuple  # (rows, classes)

# (256, 10) is a Fashion-MNIST batch; the rest are classifier heads and LM vocabularies.
GPU_SHAPES: tuple = (
    (256, 10),
    (4096, 1000),
    (4096, 32000),
    (8192, 32000),
    (2048, 128256),
    (1024, 256000),
    (16384, 131072),
)
CPU_SHAPES: tuple = ((256, 10), (4096, 1000), (4096, 32000), (8192, 32000), (1024, 128256))
QUICK_SHAPES: tuple = ((256, 10), (4096, 1000))

# The core issue's speed targets: fp32 cross-entropy fwd+bwd at these two shapes.
CORE_LARGE: Shape = (8192, 32000)
CORE_SMALL: Shape = (256, 10)


@dataclass
class Config:
    """One benchmark run's selection and measurement settings."""

    device: torch.device
    ops: Sequence[str] = OPS
    directions: Sequence[str] = DIRECTIONS
    impls: Sequence[str] = IMPLS
    shapes: Sequence[Shape] = CPU_SHAPES
    dtypes: Sequence[str] = ("float32", "bfloat16")
    reps: int = 10
    min_reps: int = 3
    # Wall-clock budget for one (op, shape, dtype, direction) group; reps shrink (not below
    # min_reps) when the slowest implementations would overrun it.
    group_budget_s: float = 60.0
    # Each timed repetition loops a call until it lasts about this long (amortises timer cost).
    rep_target_s: float = 0.02
    warmup_s: float = 0.05
    copy_mib: int = 256
    # One untimed call before each single-call repetition (see timing.interleaved).
    settle: bool = True
    memory: bool = True
    plots: bool = True
    out: Optional[Path] = None
    seed: int = 0
    suite: str = "sweep"
    extra: dict = field(default_factory=dict)

    def with_(self, **changes) -> "Config":
        """A copy with some fields changed."""
        return replace(self, **changes)


def parse_shapes(spec: str) -> list:
    """'256x10,8192x32000' -> [(256, 10), (8192, 32000)]."""
    shapes = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        rows, _, classes = part.partition("x")
        try:
            shapes.append((int(rows), int(classes)))
        except ValueError:
            raise ValueError(
                f"bad shape {part!r}; expected ROWSxCLASSES, e.g. 8192x32000"
            ) from None
        if shapes[-1][0] <= 0 or shapes[-1][1] <= 0:
            raise ValueError(f"bad shape {part!r}: sizes must be positive")
    return shapes


def parse_choices(
    spec: str, allowed: Sequence[str], what: str, aliases: Optional[dict] = None
) -> list:
    """Comma-separated names checked against ``allowed`` ('all' means all of them)."""
    if spec.strip() == "all":
        return list(allowed)
    out = []
    for name in (p.strip() for p in spec.split(",") if p.strip()):
        name = (aliases or {}).get(name, name)
        if name not in allowed:
            raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    return out


def default_shapes(device: torch.device, quick: bool) -> tuple:
    """The shape list for ``device`` (a short one in quick mode)."""
    if quick:
        return QUICK_SHAPES
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES

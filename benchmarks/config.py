"""What a benchmark run measures: ops, directions, implementations, shapes, dtypes, modes,
repetitions.

The defaults depend on the device: a GPU gets language-model vocabularies up to 16384 x 131072, a
CPU exactly the range of issue 12's speed goals, 256 x 10 to 8192 x 32000 (1024 x 128256 stays
available as the shape set "cpu-full"). Every sweep covers float32, bfloat16 and float16.

Two timing modes: "loop" times back-to-back calls (every shape); "single" times one call at a time
between unrelated work (shapes of at most ``single_max_elems`` elements, where per-call overhead
is most of the time and a loop's warm caches and branch predictors flatter it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

OPS = ("softmax", "log_softmax", "cross_entropy")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("softmax_ext", "torch", "torch.compile", "liger")
#: softmax_ext's cross-entropy with the language-model options of issue 13 (LM_OPTIONS): the core
#: suite times it beside the plain loss at CORE_LARGE; the sweep does not ("--impls" may name it).
LM_IMPL = "softmax_ext.lm"
LM_OPTIONS = {"softcap": 30.0, "lse_square_scale": 1e-4}
MODES = ("loop", "single")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {
    "fp32": "float32",
    "float32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "f16": "float16",
    "half": "float16",
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
# Issue 12's committed sweep, 256 x 10 to 8192 x 32000: the CPU default.
CPU_SHAPES: tuple = ((256, 10), (4096, 1000), (4096, 32000), (8192, 32000))
# A Llama-3 vocabulary, outside the range: available as "cpu-full", not swept by default.
CPU_FULL_SHAPES: tuple = CPU_SHAPES + ((1024, 128256),)
QUICK_SHAPES: tuple = ((256, 10), (4096, 1000))
# Names ``--shapes`` accepts besides ROWSxCLASSES.
SHAPE_SETS = {
    "cpu": CPU_SHAPES,
    "cpu-full": CPU_FULL_SHAPES,
    "gpu": GPU_SHAPES,
    "quick": QUICK_SHAPES,
}

# The core targets (benchmarks/core.py): fp32 fwd+bwd at these two shapes.
CORE_LARGE: Shape = (8192, 32000)
CORE_SMALL: Shape = (256, 10)
# Shapes up to this many elements (256 x 10 and smaller) are also timed one call at a time.
SINGLE_MAX_ELEMS = 65536


@dataclass
class Config:
    """One benchmark run's selection and measurement settings."""

    device: torch.device
    ops: Sequence[str] = OPS
    directions: Sequence[str] = DIRECTIONS
    impls: Sequence[str] = IMPLS
    shapes: Sequence[Shape] = CPU_SHAPES
    dtypes: Sequence[str] = tuple(DTYPES)
    modes: Sequence[str] = MODES
    # Explicit (rows, classes, dtype, op) groups instead of shapes x dtypes x ops (--suite core).
    plan: Optional[Sequence[tuple]] = None
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
    # Single mode: shapes of at most this many elements, this many one-call samples per
    # implementation (fewer when the group budget runs out, never below min_reps).
    single_max_elems: int = SINGLE_MAX_ELEMS
    single_reps: int = 400
    memory: bool = True
    plots: bool = True
    out: Optional[Path] = None
    seed: int = 0
    suite: str = "sweep"
    extra: dict = field(default_factory=dict)

    def with_(self, **changes) -> "Config":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def groups(self) -> list:
        """The (rows, classes, dtype, op) groups of the run, in the order they run."""
        if self.plan is not None:
            return [tuple(g) for g in self.plan]
        return [
            (rows, classes, dtype, op)
            for rows, classes in self.shapes
            for dtype in self.dtypes
            for op in self.ops
        ]

    def single_mode_at(self, rows: int, classes: int) -> bool:
        """Whether shape (rows, classes) is also timed one call at a time."""
        return "single" in self.modes and rows * classes <= self.single_max_elems


def parse_shapes(spec: str) -> list:
    """'256x10,8192x32000' -> [(256, 10), (8192, 32000)]; names of :data:`SHAPE_SETS` expand
    ('cpu,1024x128256'); duplicates are dropped."""
    shapes: list = []

    def add(shape: tuple) -> None:
        if shape not in shapes:
            shapes.append(shape)

    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in SHAPE_SETS:
            for shape in SHAPE_SETS[part]:
                add(shape)
            continue
        rows, _, classes = part.partition("x")
        try:
            shape = (int(rows), int(classes))
        except ValueError:
            raise ValueError(
                f"bad shape {part!r}; expected ROWSxCLASSES, e.g. 8192x32000, or one of "
                f"{', '.join(SHAPE_SETS)}"
            ) from None
        if shape[0] <= 0 or shape[1] <= 0:
            raise ValueError(f"bad shape {part!r}: sizes must be positive")
        add(shape)
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


def parse_impls(spec: str) -> list:
    """``--impls``: names from IMPLS or LM_IMPL; 'all' is IMPLS (the sweep's peers)."""
    if spec.strip() == "all":
        return list(IMPLS)
    return parse_choices(spec, (*IMPLS, LM_IMPL), "implementation")


def default_shapes(device: torch.device, quick: bool) -> tuple:
    """The shape list for ``device`` (a short one in quick mode)."""
    if quick:
        return QUICK_SHAPES
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES

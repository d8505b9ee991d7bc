"""Command line of ``python -m benchmarks``: parse flags, run a suite, write the results folder.

Suites: the kernel sweep (default), ``--suite core`` (the core targets, issue 12's small-shape
goals among them), ``--suite linear`` (the fused linear + cross-entropy, see linear_ce.py),
``--suite parallel`` (the vocabulary-parallel loss over gloo processes, see parallel.py) and
``--trainer`` (Fashion-MNIST trainers, wall time of 10 epochs). Kernels are timed in loop mode
and, at small shapes, in single mode (``--modes``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import report
from .config import (
    CORE_LARGE,
    CORE_SMALL,
    DIRECTIONS,
    DTYPE_ALIASES,
    DTYPES,
    IMPLS,
    LM_IMPL,
    MODES,
    OPS,
    SHAPE_SETS,
    SINGLE_MAX_ELEMS,
    Config,
    default_shapes,
    parse_choices,
    parse_impls,
    parse_shapes,
)
from .device import REPO, pick_device, slug

RESULTS_ROOT = REPO / "benchmarks" / "results"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags (see --help)."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Benchmarks of softmax_ext against torch eager, torch.compile and Liger-Kernel."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--suite",
        choices=("sweep", "core", "linear", "parallel"),
        default="sweep",
        help="sweep: every op/shape/dtype/direction selected; core: fp32 fwd+bwd of "
        "cross_entropy at 8192x32000 and 256x10 and of softmax/log_softmax at 256x10, with the "
        "target ratios; linear: the fused linear + cross-entropy against torch's "
        "linear_cross_entropy (CPU; --quick: one small case); parallel: the vocabulary-parallel "
        "cross_entropy on 2 gloo processes against torch's loss_parallel (CPU; --quick: one "
        "small case)",
    )
    ap.add_argument(
        "--trainer",
        action="store_true",
        help="run the Fashion-MNIST trainer benchmark instead of the kernels",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small shapes, fp32 only, 3 repetitions: a minute, not an hour",
    )
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--ops", default="all", help=f"comma-separated from {', '.join(OPS)}")
    ap.add_argument(
        "--directions", default="all", help=f"comma-separated from {', '.join(DIRECTIONS)}"
    )
    ap.add_argument(
        "--impls",
        default="all",
        help=f"comma-separated from {', '.join(IMPLS)} (all: these) and {LM_IMPL} (softmax_ext's "
        "cross_entropy with softcap=30, lse_square_scale=1e-4)",
    )
    ap.add_argument(
        "--shapes",
        default=None,
        help="comma-separated ROWSxCLASSES or shape sets "
        f"({', '.join(SHAPE_SETS)}) (default: cpu or gpu by device; see docs)",
    )
    ap.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated from fp32, bf16, fp16 (or float32, bfloat16, float16, half); "
        "default all three (fp32 with --quick)",
    )
    ap.add_argument(
        "--modes",
        default="all",
        help="comma-separated from loop (back-to-back calls, every shape) and single (one call "
        "after untimed other work, shapes up to --single-max-elems elements)",
    )
    ap.add_argument(
        "--single-max-elems",
        type=int,
        default=SINGLE_MAX_ELEMS,
        help="single mode times shapes of at most this many elements (rows x classes)",
    )
    ap.add_argument(
        "--single-reps",
        type=int,
        default=None,
        help="single calls per implementation in single mode (default 400, 1000 core suite, "
        "50 quick)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="interleaved repetitions per measurement (default 10 CPU, 20 GPU)",
    )
    ap.add_argument(
        "--min-reps",
        type=int,
        default=None,
        help="the time budget never cuts repetitions below this",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per (op, shape, dtype, direction) group and mode before repetitions "
        "are cut (default 10 CPU, 60 GPU, 120 core suite)",
    )
    ap.add_argument(
        "--rep-ms",
        type=float,
        default=None,
        help="each timed repetition loops calls for about this long (default 20 CPU, "
        "10 GPU, 5 quick)",
    )
    ap.add_argument(
        "--warmup-ms",
        type=float,
        default=None,
        help="minimum warm-up per implementation after its first call (default 50)",
    )
    ap.add_argument(
        "--copy-mib",
        type=int,
        default=None,
        help="size of the copy-floor tensor in MiB (default 256 CPU, 1024 GPU)",
    )
    ap.add_argument(
        "--ext-backend",
        choices=("cpp", "triton", "torch"),
        default=None,
        help="softmax_ext backend (default: cpp on CPU, triton on CUDA; 'torch' is a "
        "stand-in for development)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--thp",
        action="store_true",
        help="CPU: restart with THP_MEM_ALLOC_ENABLE=1 so large tensors get "
        "transparent huge pages (fresh gradients then fault in far faster)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument(
        "--no-settle",
        action="store_true",
        help="loop mode: no untimed call before a repetition that is a single (long) call "
        "(see docs)",
    )
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results/<device>)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    trainer = ap.add_argument_group("trainer benchmark (--trainer)")
    trainer.add_argument("--epochs", type=int, default=10)
    trainer.add_argument(
        "--data-dir",
        default="data",
        help="Fashion-MNIST folder (softmax_ext.fashion_mnist.data finds it)",
    )
    trainer.add_argument(
        "--trainer-runs",
        default="d2l,fused,torch",
        help="which trainers: d2l (the chapter's DataLoader recipe), fused, torch",
    )
    trainer.add_argument(
        "--trainer-reps",
        type=int,
        default=1,
        help="rounds of the trainer runs (interleaved; medians reported)",
    )
    trainer.add_argument(
        "--trainer-timeout",
        type=float,
        default=3600.0,
        help="seconds before one trainer run is stopped",
    )
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The run's Config from the flags, with device-dependent defaults."""
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    quick = args.quick
    core = args.suite == "core"
    cfg = Config(
        device=device,
        ops=parse_choices(args.ops, OPS, "op"),
        directions=parse_choices(args.directions, DIRECTIONS, "direction"),
        impls=parse_impls(args.impls),
        shapes=parse_shapes(args.shapes)
        if args.shapes
        else ((CORE_LARGE, CORE_SMALL) if core else default_shapes(device, quick)),
        dtypes=parse_choices(args.dtypes, list(DTYPES), "dtype", DTYPE_ALIASES)
        if args.dtypes
        else (("float32",) if quick else tuple(DTYPES)),
        modes=parse_choices(args.modes, MODES, "mode"),
        single_max_elems=args.single_max_elems,
        single_reps=args.single_reps or (50 if quick else (1000 if core else 400)),
        reps=args.reps or (3 if quick else (15 if core else (20 if gpu else 10))),
        min_reps=args.min_reps or (2 if quick else 3),
        # CPU: 10 s caps the groups of the two largest shapes at the minimum repetitions
        # (their calls take 0.1-2 s), so the default sweep stays near 20 minutes on 2 cores.
        group_budget_s=args.budget
        or (10.0 if quick else (120.0 if core else (60.0 if gpu else 10.0))),
        rep_target_s=args.rep_ms / 1e3
        if args.rep_ms
        else (0.005 if quick else (0.01 if gpu else 0.02)),
        warmup_s=args.warmup_ms / 1e3 if args.warmup_ms else (0.02 if quick else 0.05),
        copy_mib=args.copy_mib or (64 if quick else (1024 if gpu else 256)),
        memory=not args.no_memory,
        settle=not args.no_settle,
        plots=not args.no_plots,
        out=args.out,
        seed=args.seed,
        suite=args.suite,
        extra={"ext_backend": args.ext_backend, "verbose": args.verbose},
    )
    if cfg.reps < 1 or cfg.single_reps < 1 or cfg.single_max_elems < 0:
        raise ValueError("--reps and --single-reps must be positive, --single-max-elems >= 0")
    if cfg.min_reps > cfg.reps:
        cfg.min_reps = cfg.reps
    if core:
        from .core import core_config

        core_config(cfg)  # refuses --shapes without a core shape before anything runs
    return cfg


def out_folder(cfg: Config) -> Path:
    """Where results go: --out, else benchmarks/results/<device slug>."""
    return cfg.out if cfg.out is not None else RESULTS_ROOT / slug(cfg.device)


def run_kernels(cfg: Config) -> int:
    """The sweep or the core suite; writes JSON, plots and results.md."""
    from .core import evaluate, format_slower, format_targets, run_core
    from .runner import Sweep

    folder = out_folder(cfg)
    if cfg.suite == "core":
        doc = run_core(cfg)
        path = report.write_json(doc, folder / report.CORE)
    else:
        doc = Sweep(cfg).run()
        doc["targets"] = evaluate(
            doc["records"], doc["machine"]["copy_gbps"], doc["machine"].get("clone_gbps")
        )
        path = report.write_json(doc, folder / report.RESULTS)
        if cfg.plots:
            from .plots import write_plots

            write_plots(doc, folder)
    report.write_markdown(folder)
    print(
        f"wrote {path} and {folder / report.MARKDOWN} ({doc['elapsed_s']} s, "
        f"{len(doc['records'])} measurements, {len(doc['errors'])} failures)"
    )
    if doc.get("targets") or cfg.suite == "core":
        print()
        print(format_targets(doc.get("targets"), doc["machine"]))
        print()
        print(format_slower(doc.get("targets")))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m benchmarks``."""
    args = parse_args(argv)
    if args.thp and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        # c10 reads the variable once, at torch's first allocation: it must be set before start.
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        rest = list(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks", *rest])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.trainer:
        from .trainer_bench import run_trainers

        device = pick_device(args.device)
        folder = args.out if args.out is not None else RESULTS_ROOT / slug(device)
        return run_trainers(
            folder,
            device,
            epochs=args.epochs,
            data_dir=args.data_dir,
            runs=[r.strip() for r in args.trainer_runs.split(",") if r.strip()],
            timeout_s=args.trainer_timeout,
            reps=args.trainer_reps,
        )
    if args.suite == "linear":
        from .linear_ce import CASES, QUICK_CASES, run_linear

        device = pick_device(args.device)
        if device.type != "cpu":
            print("python -m benchmarks: --suite linear runs on the CPU", file=sys.stderr)
            return 2
        folder = args.out if args.out is not None else RESULTS_ROOT / slug(device)
        run_linear(
            folder,
            QUICK_CASES if args.quick else CASES,
            reps=args.reps or 3,
            memory=not args.no_memory,
            plots=not args.no_plots,
        )
        return 0
    if args.suite == "parallel":
        from .parallel import CASES as PARALLEL_CASES
        from .parallel import QUICK_CASES as PARALLEL_QUICK
        from .parallel import run_parallel

        device = pick_device(args.device)
        if device.type != "cpu":
            print("python -m benchmarks: --suite parallel runs on the CPU", file=sys.stderr)
            return 2
        folder = args.out if args.out is not None else RESULTS_ROOT / slug(device)
        run_parallel(folder, PARALLEL_QUICK if args.quick else PARALLEL_CASES, reps=args.reps or 5)
        return 0
    try:
        cfg = build_config(args)
    except (ValueError, RuntimeError) as err:
        print(f"python -m benchmarks: {err}", file=sys.stderr)
        return 2
    return run_kernels(cfg)

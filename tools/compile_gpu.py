"""Every Triton kernel of softmax_ext compiled for sm_80 and sm_90 without a GPU (make compile-gpu).

    python tools/compile_gpu.py [--jobs 2] [--arch 80 90] [--dtypes fp32 bf16 fp16]
                                [--classes 10 1000 ...] [--markdown]

1. Capture. Triton's active driver is replaced by a stand-in that reports an sm_80 device, and
   ``triton.knobs.runtime.jit_cache_hook`` records each compile request and skips the compile
   (and the launch). The real launchers (softmax_ext.triton.*) then run on meta tensors of
   representative shapes (:func:`cases`): each launcher chooses its block sizes, warps and flags
   itself, and Triton's own binder turns the arguments into the signature, constexprs and
   divisibility attributes a real launch would give (storage 16-byte aligned, ints equal to 1
   specialised, ints divisible by 16 marked so). No configuration logic is repeated here.
2. Compile. Identical requests (kernel, signature, constexprs, attributes, options) are compiled
   once per architecture with ``triton.compile`` for ``GPUTarget("cuda", 80 | 90, 32)`` in
   ``--jobs`` processes, with a throw-away cache directory. The wheel's ptxas runs as part of the
   compile; its ``-v`` report gives registers and spills, the kernel's metadata shared memory.
3. Report. One row per (kernel, config, architecture): registers, spill bytes (stores/loads),
   shared memory, and the width of the global loads of the hot loop: in the innermost loops of
   the PTX (the whole kernel where it has no loop), the most frequent form among the loads of
   2-D tiles (:func:`hot_loop_loads`). Then one summary line per kernel and one in all.
   Exits 1 on a compile error, a register spill, or a ``*_kernel`` that no case launches.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

#: Class counts of the representative shapes.
CLASSES = (10, 1000, 4096, 32000, 131072, 262144)
#: Rows of the (rows, C) cases: a batch of sequences, a multiple of 16 as usual.
ROWS = 4096
#: (outer, inner) of the softmax cases along a class dim that is not last: (8, C, 512).
OUTER, INNER = 8, 512
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
ARCHS = (80, 90)
#: Modules whose @triton.jit kernels (names ending in "_kernel") must all be reached.
MODULES = (
    "softmax_ext.triton.softmax",
    "softmax_ext.triton.cross_entropy",
    "softmax_ext.triton.soft_cross_entropy",
)


# ---------------------------------------------------------------------------------------- capture
class _StandInDriver:
    """Just enough of a Triton driver for the launch path to reach the compile request."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


@dataclasses.dataclass
class Request:
    """One compile request as the JIT would issue it."""

    module: str
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], Any]
    options: Dict[str, Any]
    arg_names: List[str]
    cases: List[str] = dataclasses.field(default_factory=list)

    def key(self) -> str:
        return repr(
            (
                self.module,
                self.kernel,
                sorted(self.signature.items()),
                sorted(self.constexprs.items()),
                sorted(self.attrs.items()),
                sorted(self.options.items()),
            )
        )

    def config(self) -> str:
        """A short description: BLOCK_R x BLOCK_C, warps, the flags that are on, VEC."""
        const = {self.arg_names[k[0]]: v for k, v in self.constexprs.items()}
        parts = []
        if "BLOCK_R" in const and "BLOCK_C" in const:
            parts.append(f"{const['BLOCK_R']}x{const['BLOCK_C']}")
        parts.append(f"w{self.options.get('num_warps', 4)}")
        for name, value in const.items():
            if name.startswith("BLOCK_") or name.startswith("stride") or name == "IS_F64":
                continue
            if value is True:
                parts.append(name.lower())
            elif value is not False and value is not None and name.isupper():
                parts.append(f"{name.lower()}{value}")
        return " ".join(parts)


def _dtype_of(signature: Dict[str, str]) -> str:
    """The dtype of the logits (x_ptr), or of the softmax output (y_ptr)."""
    for name in ("x_ptr", "y_ptr"):
        if name in signature:
            return signature[name].lstrip("*")
    return next(v for v in signature.values() if v.startswith("*")).lstrip("*")


class Capture:
    """Records the compile requests of launches while active (see the module docstring)."""

    def __init__(self) -> None:
        self.requests: List[Request] = []
        self.case = ""
        self._defaults: Dict[str, Any] = {}

    def __enter__(self) -> "Capture":
        from triton import knobs
        from triton.compiler import make_backend
        from triton.runtime.driver import driver

        stand_in = _StandInDriver(ARCHS[0])
        # The real driver is never created (without a GPU it cannot be); restored as found.
        self._old = (knobs.runtime.jit_cache_hook, driver._active)
        backend = make_backend(stand_in.target)
        self._defaults = _plain(dataclasses.asdict(backend.parse_options({})))
        driver.set_active(stand_in)
        knobs.runtime.jit_cache_hook = self._hook
        return self

    def __exit__(self, *exc: Any) -> None:
        from triton import knobs
        from triton.runtime.driver import driver

        knobs.runtime.jit_cache_hook, driver._active = self._old

    def _hook(self, *, fn: Any, compile: Dict[str, Any], **_: Any) -> bool:
        jit = fn.jit_function
        spec = json.loads(compile["specialization_data"])
        # Only options that differ from the target's defaults travel: target-dependent ones
        # (arch, fp8 types, ...) are derived again for each architecture.
        options = {
            k: v
            for k, v in _plain(spec["options"]).items()
            if self._defaults.get(k, v) != v or k not in self._defaults
        }
        options.pop("arch", None)
        self.requests.append(
            Request(
                module=fn.module,
                kernel=fn.name,
                signature=dict(compile["signature"]),
                constexprs=dict(compile["constants"]),
                attrs={k: _plain(v) for k, v in compile["configs"][0].items()},
                options=options,
                arg_names=list(jit.arg_names),
                cases=[self.case],
            )
        )
        return True  # skip the compile (and the launch)


def _plain(value: Any) -> Any:
    """JSON-ish values as hashable, comparable tuples."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def cases(dtypes: List[str], classes: List[int]) -> List[Tuple[str, Callable[..., Any], tuple]]:
    """(label, launcher, arguments) of every representative launch, on meta tensors laid out as
    the operators pass them: contiguous logits and targets, per-row gradients expanded from a
    scalar (reduction "mean", the default) or one per row ("none"), then the option block
    (ops.LossOptions) in schema order; label smoothing 0 and 0.1 for index targets (the kernels'
    WITH_SMOOTH off and on), 0.1 for soft ones (a runtime value there); soft-capping with
    smoothing and the log-sum-exp gradient for both."""
    from softmax_ext.ops import LossOptions
    from softmax_ext.triton import cross_entropy as ce
    from softmax_ext.triton import soft_cross_entropy as sce
    from softmax_ext.triton import softmax as sm

    def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    out: List[Tuple[str, Callable[..., Any], tuple]] = []
    for dname in dtypes:
        dt = DTYPES[dname]
        acc = torch.float64 if dt == torch.float64 else torch.float32
        for c in classes:
            x, q = empty(ROWS, c, dtype=dt), empty(ROWS, c, dtype=dt)
            xs = empty(OUTER, c, INNER, dtype=dt)
            t, w = empty(ROWS, dtype=torch.int64), empty(c, dtype=acc)
            lse, tsum = empty(ROWS, dtype=torch.float64), empty(ROWS, dtype=acc)
            glse = empty(ROWS, dtype=acc)
            # (tag, grad_loss, reduction as torch's at::Reduction: 0 none, 1 mean)
            g_mean = ("", empty(dtype=acc).expand(ROWS), 1)
            g_none = (" none", empty(ROWS, dtype=acc), 0)
            tag = f"{dname} ({ROWS}, {c})"
            stag = f"{dname} ({OUTER}, {c}, {INNER})"
            for log in (False, True):
                op = "log_softmax" if log else "softmax"
                out.append((f"{op} {tag} dim=1", sm.softmax_fwd, (x, 1, log)))
                out.append((f"{op} bwd {tag} dim=1", sm.softmax_bwd, (x, x, 1, log)))
                out.append((f"{op} {stag} dim=1", sm.softmax_fwd, (xs, 1, log)))
                out.append((f"{op} bwd {stag} dim=1", sm.softmax_bwd, (xs, xs, 1, log)))
            for weight in (None, w):
                wtag = "" if weight is None else " weight"
                for eps in (0.0, 0.1):
                    otag = wtag + (" smoothing" if eps else "")
                    fwd = (x, t, weight, *LossOptions(label_smoothing=eps))
                    out.append((f"ce_index {tag}{otag}", ce.ce_index_fwd, fwd))
                    for rtag, g, reduction in [g_mean] + ([g_none] if not otag else []):
                        o = LossOptions(label_smoothing=eps, reduction=reduction)
                        args = (g, x, t, weight, lse, None, *o)
                        out.append((f"ce_index bwd {tag}{otag}{rtag}", ce.ce_index_bwd, args))
                    # the log-sum-exp output's gradient (z-loss, return_lse)
                    o = LossOptions(label_smoothing=eps)
                    args = (g_mean[1], x, t, weight, lse, glse, *o)
                    out.append((f"ce_index bwd {tag}{otag} lse-grad", ce.ce_index_bwd, args))
                # logit soft-capping, with smoothing and the log-sum-exp gradient
                o = LossOptions(label_smoothing=0.1, softcap=30.0)
                out.append((f"ce_index {tag}{wtag} softcap", ce.ce_index_fwd, (x, t, weight, *o)))
                args = (g_mean[1], x, t, weight, lse, glse, *o)
                out.append((f"ce_index bwd {tag}{wtag} softcap", ce.ce_index_bwd, args))
                out.append((f"ce_soft {tag}{wtag} softcap", sce.ce_soft_fwd, (x, q, weight, *o)))
                args = (g_mean[1], x, q, weight, lse, tsum, glse, *o)
                out.append((f"ce_soft bwd {tag}{wtag} softcap", sce.ce_soft_bwd, args))
                fwd = (x, q, weight, *LossOptions(label_smoothing=0.1))
                out.append((f"ce_soft {tag}{wtag}", sce.ce_soft_fwd, fwd))
                for rtag, g, reduction in [g_mean] + ([g_none] if weight is None else []):
                    o = LossOptions(label_smoothing=0.1, reduction=reduction)
                    args = (g, x, q, weight, lse, tsum, None, *o)
                    out.append((f"ce_soft bwd {tag}{wtag}{rtag}", sce.ce_soft_bwd, args))
                o = LossOptions(label_smoothing=0.1)
                args = (g_mean[1], x, q, weight, lse, tsum, glse, *o)
                out.append((f"ce_soft bwd {tag}{wtag} lse-grad", sce.ce_soft_bwd, args))
    return out


def capture(dtypes: List[str], classes: List[int]) -> List[Request]:
    """Deduplicated compile requests of all cases, in first-seen order."""
    unique: Dict[str, Request] = {}
    with Capture() as cap:
        for label, launcher, args in cases(dtypes, classes):
            cap.case = label
            before = len(cap.requests)
            launcher(*args)
            if len(cap.requests) == before:
                raise SystemExit(f"compile-gpu: case {label!r} launched no kernel")
        for req in cap.requests:
            seen = unique.setdefault(req.key(), req)
            if seen is not req:
                seen.cases.extend(req.cases)
    return list(unique.values())


def all_kernels() -> List[Tuple[str, str]]:
    """(module, name) of every @triton.jit kernel (name ending in "_kernel") in MODULES."""
    import importlib

    from triton.runtime.jit import JITFunction

    found = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found.append((mod_name, name))
    return found


# ---------------------------------------------------------------------------------------- compile
@dataclasses.dataclass
class Result:
    request: Request
    arch: int
    seconds: float = 0.0
    error: str = ""
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    vector: str = ""
    vector_bits: int = 0


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_LABEL = re.compile(r"^\s*(\$L\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L\w+)\s*;")
_LOAD = re.compile(r"\bld\.global((?:\.[\w:]+)+)")
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_TT_LOAD = re.compile(r"=\s*tt\.load\s.*:\s*tensor<([0-9x]+)x!tt\.ptr<.*\sloc\((#loc\d*)\)\s*$")
_TT_LOC_DEF = re.compile(r"^(#loc\d*)\s*=\s*(loc\(.*\))\s*$")


def _tile_load_locs(ttgir: str) -> set:
    """(file name, line, column) of every load of a 2-D tile in ``ttgir``: the row (or lane)
    data, as opposed to per-row gathers such as targets and the target's logit."""
    defs = {}
    for line in ttgir.splitlines():
        m = _TT_LOC_DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2)

    def resolve(ref: str, depth: int = 0) -> Optional[Tuple[str, int, int]]:
        text = defs.get(ref, "")
        if depth > 50:
            return None
        m = re.match(r'loc\("([^"]+)":(\d+):(\d+)\)', text)
        if m:
            return os.path.basename(m.group(1)), int(m.group(2)), int(m.group(3))
        m = re.match(r"loc\(callsite\((#loc\d*) at (#loc\d*)\)\)", text)
        if m:  # the callee's own line, else the call's
            return resolve(m.group(1), depth + 1) or resolve(m.group(2), depth + 1)
        m = re.match(r'loc\("[^"]*"\((#loc\d*)\)\)', text)
        if m:  # a named location
            return resolve(m.group(1), depth + 1)
        return None

    locs = set()
    for line in ttgir.splitlines():
        m = _TT_LOAD.search(line)
        if m and m.group(1).count("x") == 1:
            loc = resolve(m.group(2))
            if loc:
                locs.add(loc)
    return locs


def hot_loop_loads(ptx: str, ttgir: str = "") -> Tuple[str, int]:
    """(form, bits) of the global loads of the hot loop in ``ptx``, e.g. ("v4.b32", 128).

    The hot loop is the innermost loops (a loop is a label with a later branch back to it, an
    innermost one contains no other), or the whole kernel where there is no loop. Counted are the
    loads of 2-D tiles (their source locations from ``ttgir``), which carry the rows; per-row
    gathers (a target, its logit) would otherwise outnumber them in short-row tiles. Where none is
    found, every load counts. The most frequent form wins, ties going to the wider one; ("-", 0)
    when nothing is loaded.
    """
    lines = ptx.splitlines()
    labels: Dict[str, int] = {}
    loops = []
    files: Dict[str, str] = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in labels:
            loops.append((labels[b.group(1)], i))
        f = _PTX_FILE.match(line)
        if f:
            files[f.group(1)] = os.path.basename(f.group(2))
    inner = [
        (a, b)
        for a, b in loops
        if not any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in loops)
    ]
    spans = inner or [(0, len(lines) - 1)]
    tile_locs = _tile_load_locs(ttgir) if ttgir else set()
    counts: Dict[bool, collections.Counter] = {
        True: collections.Counter(),
        False: collections.Counter(),
    }
    loc = None
    # The source location in force at a span's start is the last .loc before it.
    for a, b in spans:
        loc, in_asm = None, False
        for line in lines[: a + 1][::-1]:
            m = _PTX_LOC.match(line)
            if m:
                loc = (files.get(m.group(1), ""), int(m.group(2)), int(m.group(3)))
                break
        asm_loc: Optional[Tuple[str, int, int]] = None
        for line in lines[a : b + 1]:
            if "// begin inline asm" in line or "// end inline asm" in line:
                asm_loc = None
                in_asm = "begin" in line
                continue
            m = _PTX_LOC.match(line)
            if m:
                # Inside an inline-asm block the line number counts the block's own lines up
                # from the first: that first one is the source location.
                here = (files.get(m.group(1), ""), int(m.group(2)), int(m.group(3)))
                if not in_asm:
                    loc = here
                elif asm_loc is None:
                    asm_loc = loc = here
                continue
            m = _LOAD.search(line)
            if not m:
                continue
            parts = m.group(1).strip(".").split(".")
            lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
            width = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 0)
            form = (f"v{lanes}." if lanes > 1 else "") + f"b{width}"
            counts[loc in tile_locs][(lanes * width, form)] += 1
    chosen = counts[True] or counts[False]
    if not chosen:
        return "-", 0
    (bits, form), _ = max(chosen.items(), key=lambda kv: (kv[1], kv[0][0]))
    return form, bits


def compile_one(request: Request, arch: int) -> Result:
    """Compile ``request`` for sm_``arch`` (run in a worker process)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(request, arch)
    fn = getattr(importlib.import_module(request.module), request.kernel)
    src = ASTSource(
        fn=fn, signature=request.signature, constexprs=request.constexprs, attrs=request.attrs
    )
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src, target=GPUTarget("cuda", arch, 32), options=dict(request.options)
            )
    except Exception as exc:  # noqa: BLE001 - any compile failure is reported, not raised
        result.error = f"{type(exc).__name__}: {exc}".strip()[:4000]
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = _PTXAS_REGS.findall(text)
    spills = _PTXAS_SPILL.findall(text)
    if not regs or not spills:
        result.error = "no ptxas -v report (is the kernel cached? the cache dir must be fresh)"
        return result
    result.regs = max(int(r) for r in regs)
    result.spill_stores = max(int(s) for s, _ in spills)
    result.spill_loads = max(int(lo) for _, lo in spills)
    result.shared = int(compiled.metadata.shared)
    result.vector, result.vector_bits = hot_loop_loads(compiled.asm["ptx"], compiled.asm["ttgir"])
    return result


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(requests: List[Request], archs: List[int], jobs: int) -> List[Result]:
    jobs_list = [(req, arch) for req in requests for arch in archs]
    cache_dir = tempfile.mkdtemp(prefix="softmax_ext-compile-gpu-")
    try:
        if jobs <= 1:
            _worker_init(cache_dir)
            return [compile_one(r, a) for r, a in jobs_list]
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_worker_init, initargs=(cache_dir,)
        ) as pool:
            return list(pool.map(compile_one, *zip(*jobs_list, strict=True), chunksize=4))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------- report
HEADER = ("kernel", "dtype", "config", "sm", "regs", "spills st/ld", "smem", "hot loads", "cases")


def _name(req: Request) -> str:
    return req.kernel.strip("_").removesuffix("_kernel")


def _what(r: Result) -> str:
    req = r.request
    return f"{_name(req)} {_dtype_of(req.signature)} [{req.config()}] sm_{r.arch} ({req.cases[0]})"


def rows(results: List[Result]) -> List[Tuple[str, ...]]:
    """One row per (kernel, config, architecture)."""
    out = []
    for r in results:
        req = r.request
        head = (_name(req), _dtype_of(req.signature), req.config(), f"sm_{r.arch}")
        if r.error:
            cells: Tuple[str, ...] = ("ERROR", "-", "-", "-")
        else:
            vec = f"{r.vector_bits} ({r.vector})" if r.vector_bits else "-"
            cells = (str(r.regs), f"{r.spill_stores}/{r.spill_loads}", str(r.shared), vec)
        more = f" (+{len(req.cases) - 1})" if len(req.cases) > 1 else ""
        out.append(head + cells + (req.cases[0] + more,))
    return out


def print_table(table: List[Tuple[str, ...]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for row in table:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(HEADER)]
    for row in [HEADER, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def summary(results: List[Result], seconds: float) -> List[str]:
    """Per kernel: configurations, register range, spills, hot-loop load widths; then totals."""
    lines = []
    by_kernel: Dict[str, List[Result]] = collections.defaultdict(list)
    for r in results:
        by_kernel[_name(r.request)].append(r)
    for name, group in by_kernel.items():
        ok = [r for r in group if not r.error]
        if not ok:
            lines.append(f"{name}: {len(group)} compiles, all failed")
            continue
        top = max(ok, key=lambda r: r.regs)
        widths = collections.Counter(r.vector_bits for r in ok)
        spilled = sum(1 for r in ok if r.spill_stores or r.spill_loads)
        lines.append(
            f"{name}: {len({r.request.key() for r in group})} configs, registers "
            f"{min(r.regs for r in ok)}-{top.regs} (max: {_dtype_of(top.request.signature)} "
            f"[{top.request.config()}] sm_{top.arch}), {spilled} spilling, hot-loop load bits "
            + " ".join(f"{b}:{n}" for b, n in sorted(widths.items()))
            + (f", {len(group) - len(ok)} errors" if len(ok) < len(group) else "")
        )
    ok = [r for r in results if not r.error]
    configs = len({r.request.key() for r in results})
    lines.append(
        f"triton {triton.__version__}, torch {torch.__version__}: {len(results)} compiles "
        f"({configs} configurations x {len({r.arch for r in results})} architectures) in "
        f"{seconds:.0f} s; registers max {max((r.regs for r in ok), default=-1)}, shared memory "
        f"max {max((r.shared for r in ok), default=-1)} B"
    )
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=DTYPES)
    parser.add_argument("--classes", type=int, nargs="+", default=list(CLASSES))
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    # Kernels must be compiled, not interpreted (the flag is read when they are defined).
    os.environ.pop("TRITON_INTERPRET", None)

    start = time.perf_counter()
    requests = capture(args.dtypes, args.classes)
    reached = {(r.module, r.kernel) for r in requests}
    missing = [f"{m}.{k}" for m, k in all_kernels() if (m, k) not in reached]
    results = compile_all(requests, args.arch, args.jobs)
    seconds = time.perf_counter() - start

    print_table(rows(results), args.markdown)
    print()
    for line in summary(results, seconds):
        print(line)
    failures = [f"{name}: no representative case launches it" for name in missing]
    for r in results:
        if r.error:
            failures.append(f"{_what(r)}: compile error:\n{r.error}")
        elif r.spill_stores or r.spill_loads:
            failures.append(
                f"{_what(r)}: register spill, {r.spill_stores} B stored / {r.spill_loads} B "
                f"loaded ({r.regs} registers)"
            )
    for f in failures:
        print(f"compile-gpu: FAIL {f}", file=sys.stderr)
    if failures:
        print(f"compile-gpu: {len(failures)} failure(s)", file=sys.stderr)
        return 1
    print("compile-gpu: OK (no compile error, no register spill)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Smoke tests of the benchmark harness (benchmarks/): a tiny sweep into a temporary folder (loop
and single mode), the schema of results.json, a tiny core suite, and the pieces that need no
timing (bytes model, targets on synthetic records, report, flag parsing). Nothing here asserts a
speed: the machine need not be quiet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import softmax_ext  # noqa: E402
from benchmarks import bandwidth, core, peers, plots, report  # noqa: E402
from benchmarks.cli import build_config, main, parse_args  # noqa: E402
from benchmarks.config import (  # noqa: E402
    CPU_FULL_SHAPES,
    CPU_SHAPES,
    DTYPE_ALIASES,
    DTYPES,
    Config,
    parse_choices,
    parse_shapes,
)
from benchmarks.runner import choose_single_reps  # noqa: E402
from benchmarks.timing import Calibration, CpuTimer, Step, interleaved_single  # noqa: E402
from benchmarks.trainer_bench import command  # noqa: E402

SHAPES = [(64, 10), (32, 300)]
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Single mode covers the first shape only (640 elements), with 3 calls per implementation.
SINGLE_MAX_ELEMS = 1000
SINGLE_REPS = 3
RECORD_FIELDS = {
    "op": str,
    "direction": str,
    "impl": str,
    "backend": str,
    "rows": int,
    "classes": int,
    "dtype": str,
    "mode": str,
    "median_ms": float,
    "min_ms": float,
    "max_ms": float,
    "gbps": float,
    "frac_of_copy": float,
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("bench")
    shapes = ",".join(f"{n}x{c}" for n, c in SHAPES)
    rc = main(
        [
            "--quick",
            "--device",
            "cpu",
            "--shapes",
            shapes,
            "--dtypes",
            "fp32,bf16,fp16",
            "--reps",
            "2",
            "--single-max-elems",
            str(SINGLE_MAX_ELEMS),
            "--single-reps",
            str(SINGLE_REPS),
            "--impls",
            "softmax_ext,torch",
            "--copy-mib",
            "16",
            "--budget",
            "2",
            "--rep-ms",
            "1",
            "--warmup-ms",
            "2",
            "--no-plots",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_machine_fields(sweep):
    _, doc = sweep
    m = doc["machine"]
    assert "cpu" in m["device"]
    for key in ("torch", "triton", "threads", "cpu_model"):
        assert key in m
    assert m["copy_gbps"] > 0 and m["threads"] >= 1


def test_every_measurement_is_recorded_with_the_schema(sweep):
    _, doc = sweep
    assert doc["errors"] == [], doc["errors"]
    got = [
        (r["op"], r["direction"], r["impl"], r["rows"], r["classes"], r["dtype"], r["mode"])
        for r in doc["records"]
    ]
    want = {
        (op, d, impl, n, c, dt, mode)
        for op in ("softmax", "log_softmax", "cross_entropy")
        for d in ("fwd", "bwd", "fwd+bwd")
        for impl in ("softmax_ext", "torch")
        for n, c in SHAPES
        for dt in DTYPE_NAMES
        for mode in (("loop", "single") if n * c <= SINGLE_MAX_ELEMS else ("loop",))
    }
    assert len(got) == len(set(got)) and set(got) == want
    for r in doc["records"]:
        for key, kind in RECORD_FIELDS.items():
            assert isinstance(r[key], kind), (key, r)
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["impl"] in ("softmax_ext", "torch", "torch.compile", "liger")
        assert "peak_mem_bytes" in r
        if r["direction"] == "fwd+bwd":
            assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0
            assert isinstance(r["rss_peak_growth_bytes"], int)
        other = "torch" if r["impl"] == "softmax_ext" else "softmax_ext"
        assert r[f"speedup_vs_{other}"] > 0


def test_single_mode_records_are_single_calls(sweep):
    _, doc = sweep
    single = [r for r in doc["records"] if r["mode"] == "single"]
    assert single and all((r["rows"], r["classes"]) == SHAPES[0] for r in single)
    for r in single:
        assert r["inner"] == 1 and r["reps"] == SINGLE_REPS, r
    assert doc["config"]["modes"] == ["loop", "single"]
    assert doc["config"]["single_between_ms"] > 0
    # speed-ups compare implementations within one mode
    loop = {
        (r["op"], r["direction"], r["dtype"], r["impl"]): r
        for r in doc["records"]
        if r["mode"] == "loop" and (r["rows"], r["classes"]) == SHAPES[0]
    }
    for r in single:
        other = "torch" if r["impl"] == "softmax_ext" else "softmax_ext"
        peer = next(
            p
            for p in single
            if p["impl"] == other
            and (p["op"], p["direction"], p["dtype"]) == (r["op"], r["direction"], r["dtype"])
        )
        assert r[f"speedup_vs_{other}"] == pytest.approx(peer["median_ms"] / r["median_ms"])
        assert (r["op"], r["direction"], r["dtype"], r["impl"]) in loop


def test_cross_entropy_saves_o_of_n_for_backward(sweep):
    _, doc = sweep
    for r in doc["records"]:
        if r["op"] == "cross_entropy" and r["direction"] == "fwd+bwd":
            size = r["rows"] * r["classes"] * DTYPES[r["dtype"]].itemsize
            if r["impl"] == "softmax_ext":
                assert r["saved_bytes"] <= 64 * r["rows"] + 64, r
            else:  # torch keeps the log-probabilities
                assert r["saved_bytes"] >= size, r


def test_report_is_written(sweep):
    out, _ = sweep
    md = (out / "results.md").read_text()
    assert "vs torch" in md and "cross_entropy fwd+bwd" in md
    assert "| mode |" in md and "| single |" in md and "| loop |" in md
    assert "Cases slower than torch eager" in md and "every case: worst time" in md


def test_plots(sweep, tmp_path):
    _, doc = sweep
    ce = [r for r in doc["records"] if r["op"] == "cross_entropy" and r["direction"] == "fwd+bwd"]
    plots.plot_classes(ce, "cross_entropy", tmp_path / "c.png", "test", doc["machine"]["copy_gbps"])
    plots.plot_scaling(ce, doc["machine"]["copy_gbps"], tmp_path / "s.png", "test")
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0


def test_min_bytes_model():
    f32 = torch.float32
    nc = 8192 * 32000 * 4
    assert bandwidth.min_bytes("cross_entropy", "fwd+bwd", 8192, 32000, f32) == 2 * nc + 8192 * 8
    assert bandwidth.min_bytes("softmax", "fwd", 8192, 32000, f32) == 2 * nc
    assert bandwidth.min_bytes("log_softmax", "bwd", 10, 10, torch.bfloat16) == 3 * 200


def _rec(impl, shape, ms, op="cross_entropy", mode="loop", **fields):
    """A synthetic record: fp32 fwd+bwd unless ``fields`` say otherwise."""
    return {
        "op": op,
        "direction": "fwd+bwd",
        "dtype": "float32",
        "rows": shape[0],
        "classes": shape[1],
        "mode": mode,
        "impl": impl,
        "median_ms": ms,
        "reps": 5,
        "inner": 1 if mode == "single" else 100,
        **fields,
    }


def _small_records(ratios: dict) -> list:
    """softmax_ext and torch eager at 256x10 for every op and mode, ext/eager = ``ratios``."""
    out = []
    for (op, mode), ratio in ratios.items():
        out += [
            _rec("softmax_ext", core.CORE_SMALL, 0.1 * ratio, op, mode),
            _rec("torch", core.CORE_SMALL, 0.1, op, mode),
        ]
    return out


def _verdicts(targets: dict) -> dict:
    return {t["id"]: t["pass"] for t in targets["items"]}


def test_core_targets_from_records():
    big = core.CORE_LARGE
    small_ratios = {
        ("cross_entropy", "loop"): 0.75,  # goal 0.8: pass
        ("cross_entropy", "single"): 0.85,  # fail
        ("softmax", "loop"): 1.0,  # goal 1.0: pass at equality
        ("softmax", "single"): 0.9,
        ("log_softmax", "loop"): 0.95,
        ("log_softmax", "single"): 1.2,  # fail, and the worst case of the run
    }
    records = [
        _rec("softmax_ext", big, 100.0, saved_bytes=8192 * 4),
        _rec("torch", big, 1200.0),
        _rec("torch.compile", big, 250.0),
        *_small_records(small_ratios),
        # a case outside the named goals, slower than eager: counted by the summary target
        _rec("softmax_ext", (4096, 1000), 2.2, "softmax", direction="bwd", dtype="float16"),
        _rec("torch", (4096, 1000), 2.0, "softmax", direction="bwd", dtype="float16"),
        _rec("torch.compile", (4096, 1000), 1.0, "softmax", direction="bwd", dtype="float16"),
    ]
    copy_gbps = 2 * 8192 * 32000 * 4 / 1e9 / 0.06  # floor = 60 ms
    targets = core.evaluate(records, copy_gbps)
    assert _verdicts(targets) == {
        "large_vs_eager": True,
        "large_vs_compile": False,
        "large_copy_floor": True,
        "large_saved_per_row": True,
        "small_cross_entropy_loop": True,
        "small_cross_entropy_single": False,
        "small_softmax_loop": True,
        "small_softmax_single": True,
        "small_log_softmax_loop": True,
        "small_log_softmax_single": False,
        "no_slower_anywhere": False,
    }
    goals = {t["id"]: t["goal"] for t in targets["items"]}
    assert goals["small_cross_entropy_loop"] == 0.8 and goals["small_softmax_single"] == 1.0
    assert not targets["all_pass"] and targets["not_measured"] == 0
    worst = next(t for t in targets["items"] if t["id"] == "no_slower_anywhere")
    assert worst["value"] == pytest.approx(1.2)
    assert "log_softmax fwd+bwd float32 256x10 single" in worst["detail"]
    # beside eager: the 6 small cases, the large one (12x faster) and the fp16 softmax bwd
    assert targets["cases"] == 8
    slower = [(c["op"], c["mode"], round(c["ratio"], 2)) for c in targets["slower"]]
    assert slower == [("log_softmax", "single", 1.2), ("softmax", "loop", 1.1)]
    text = core.format_targets(targets, {"device": "cpu (x)", "threads": 2, "copy_gbps": 1.0})
    assert "FAIL" in text and "PASS" in text and "NOT all targets met" in text
    table = core.format_slower(targets)
    assert "log_softmax fwd+bwd" in table and "softmax bwd" in table and "1.10" in table


def test_core_target_language_model_options():
    """softmax_ext.lm (softcap=30, lse_square_scale=1e-4) / softmax_ext at the large shape, goal
    1.15: present when the run timed softmax_ext.lm, not measured when its large record is
    missing, absent from runs that never timed it."""
    big = core.CORE_LARGE
    plain = [_rec("softmax_ext", big, 100.0), _rec("torch", big, 1200.0)]
    for lm_ms, verdict in ((114.0, True), (115.0, True), (250.0, False)):
        targets = core.evaluate([*plain, _rec("softmax_ext.lm", big, lm_ms)], 10.0)
        item = next(t for t in targets["items"] if t["id"] == "large_lm_options")
        assert item["pass"] is verdict and item["goal"] == 1.15
        assert item["value"] == pytest.approx(lm_ms / 100.0)
        assert "softcap=30" in item["name"] and "lse_square_scale=0.0001" in item["name"]
    only_small = _rec("softmax_ext.lm", core.CORE_SMALL, 0.1)
    assert _verdicts(core.evaluate([*plain, only_small], 10.0))["large_lm_options"] is None
    assert "large_lm_options" not in _verdicts(core.evaluate(plain, 10.0))
    # the lm records are not cases against torch eager
    assert core.evaluate([*plain, _rec("softmax_ext.lm", big, 500.0)], 10.0)["cases"] == 1


def test_core_suite_times_the_language_model_options():
    cfg = build_config(parse_args(["--device", "cpu", "--suite", "core"]))
    assert "softmax_ext.lm" not in cfg.impls  # not in the sweep's "all"
    assert core.core_config(cfg).impls[-1] == "softmax_ext.lm"
    small_only = build_config(
        parse_args(["--device", "cpu", "--suite", "core", "--shapes", "256x10"])
    )
    assert "softmax_ext.lm" not in core.core_config(small_only).impls
    named = build_config(parse_args(["--device", "cpu", "--impls", "softmax_ext,softmax_ext.lm"]))
    assert named.impls == ["softmax_ext", "softmax_ext.lm"]
    with pytest.raises(ValueError, match="unknown implementation"):
        build_config(parse_args(["--device", "cpu", "--impls", "softmax_ext.nope"]))
    fn = peers.ext_lm_fn("cross_entropy", "cpp")
    x = torch.randn(4, 7, dtype=torch.float64)
    t = torch.tensor([0, 3, 6, 2])
    expected = softmax_ext.cross_entropy(x, t, softcap=30.0, lse_square_scale=1e-4)
    torch.testing.assert_close(fn(x, t), expected)
    assert not torch.allclose(fn(x, t), softmax_ext.cross_entropy(x, t))


def test_core_targets_all_pass_and_none_slower():
    records = _small_records(
        {(op, mode): 0.5 for op in core.SMALL_GOALS for mode in ("loop", "single")}
    )
    targets = core.evaluate(records, 10.0)
    assert all(_verdicts(targets).values()) and targets["all_pass"]
    assert targets["slower"] == [] and targets["cases"] == 6
    assert core.format_slower(targets).endswith("none")
    assert "all targets met" in core.format_targets(targets, {})


def test_core_targets_missing_mode_is_not_measured():
    records = _small_records({(op, "loop"): 0.5 for op in core.SMALL_GOALS})
    targets = core.evaluate(records, 10.0)
    verdicts = _verdicts(targets)
    assert verdicts["small_softmax_loop"] is True and verdicts["small_softmax_single"] is None
    assert not targets["all_pass"] and targets["not_measured"] == 3
    assert "3 not measured" in core.format_targets(targets, {})
    # records from before the modes existed count as loop mode
    legacy = [{k: v for k, v in r.items() if k != "mode"} for r in records]
    assert _verdicts(core.evaluate(legacy, 10.0)) == verdicts
    assert core.evaluate([], 10.0) is None


def test_single_call_timing_interleaves_and_disturbs():
    events = []

    def step(name):
        return Step(run=lambda: events.append(name), prepare=lambda: events.append(f"prep {name}"))

    steps = {"a": step("a"), "b": step("b")}
    samples = interleaved_single(steps, CpuTimer(), 4, lambda: events.append("work"))
    assert {n: len(v) for n, v in samples.items()} == {"a": 4, "b": 4}
    assert all(t >= 0 for v in samples.values() for t in v)
    # every call follows the untimed work and its own preparation; the order rotates
    assert events[:6] == ["work", "prep a", "a", "work", "prep b", "b"]
    assert events[6:12] == ["work", "prep b", "b", "work", "prep a", "a"]


def test_single_reps_follow_the_budget():
    cfg = Config(device=torch.device("cpu"), single_reps=400, min_reps=3, group_budget_s=1.0)
    fast = {"a": Calibration(0.0, 1e-4, 100), "b": Calibration(0.0, 1e-4, 100)}
    assert choose_single_reps(cfg, fast, "fwd", 4e-4) == 400
    slow = {"a": Calibration(0.0, 0.125, 1)}
    assert choose_single_reps(cfg, slow, "fwd", 0.0) == 8
    assert choose_single_reps(cfg, slow, "bwd", 0.0) == 4  # the untimed forward counts
    assert choose_single_reps(cfg, {"a": Calibration(0.0, 2.0, 1)}, "fwd", 0.0) == 3
    assert choose_single_reps(cfg.with_(single_reps=2), slow, "fwd", 0.0) == 2


def test_core_suite_at_the_small_shape(tmp_path):
    rc = main(
        [
            "--suite",
            "core",
            "--device",
            "cpu",
            "--shapes",
            "256x10",
            "--impls",
            "softmax_ext,torch",
            "--reps",
            "2",
            "--single-reps",
            "3",
            "--copy-mib",
            "16",
            "--rep-ms",
            "1",
            "--warmup-ms",
            "2",
            "--no-memory",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "core.json").read_text())
    assert {(r["op"], r["mode"]) for r in doc["records"]} == {
        (op, mode) for op in core.SMALL_GOALS for mode in ("loop", "single")
    }
    items = {t["id"]: t for t in doc["targets"]["items"]}
    assert set(items) == {
        *(f"small_{op}_{mode}" for op in core.SMALL_GOALS for mode in ("loop", "single")),
        "no_slower_anywhere",
    }
    for t in items.values():  # measured, with a verdict; which one depends on the machine
        assert t["value"] > 0 and t["pass"] in (True, False)
    md = (tmp_path / "results.md").read_text()
    assert "cross_entropy: time / torch eager at N=256, C=10, single" in md


def test_trainer_section_in_markdown(tmp_path):
    doc = {
        "machine": {"device": "cpu (x)"},
        "date": "today",
        "epochs": 10,
        "runs": [
            {
                "name": "d2l recipe",
                "train_seconds": 100.0,
                "wall_seconds": 110.0,
                "epochs": 10,
                "test_acc": 0.83,
            },
            {
                "name": "softmax_ext.train --loss fused",
                "train_seconds": 10.0,
                "wall_seconds": 15.0,
                "epochs": 10,
                "test_acc": 0.83,
            },
        ],
    }
    report.write_json(doc, tmp_path / report.TRAINER)
    md = report.write_markdown(tmp_path).read_text()
    assert "## Trainer" in md and "10.00x" in md


def test_cli_parsing():
    assert parse_shapes("256x10, 8192x32000") == [(256, 10), (8192, 32000)]
    assert parse_shapes("cpu,1024x128256,256x10") == list(CPU_FULL_SHAPES)
    with pytest.raises(ValueError):
        parse_shapes("256by10")
    assert main(["--ops", "nope"]) == 2
    assert main(["--modes", "loop,twice"]) == 2
    assert main(["--suite", "core", "--shapes", "64x10"]) == 2
    cmd = command("fused", Path("o"), 10, "data", torch.device("cpu"))
    assert cmd[1:5] == ["-m", "softmax_ext.train", "--loss", "fused"]


def test_dtypes_and_default_sweep():
    assert parse_choices("fp16,half,float16,bf16", list(DTYPES), "dtype", DTYPE_ALIASES) == [
        "float16",
        "bfloat16",
    ]
    assert DTYPES["float16"] is torch.float16
    cfg = build_config(parse_args(["--device", "cpu", "--dtypes", "fp16"]))
    assert cfg.dtypes == ["float16"]
    cfg = build_config(parse_args(["--device", "cpu"]))
    assert tuple(cfg.dtypes) == DTYPE_NAMES and tuple(cfg.modes) == ("loop", "single")
    # issue 12's range exactly: 256x10 to 8192x32000
    issue_range = ((256, 10), (4096, 1000), (4096, 32000), (8192, 32000))
    assert tuple(cfg.shapes) == CPU_SHAPES == issue_range
    assert [s for s in cfg.shapes if cfg.single_mode_at(*s)] == [(256, 10)]
    core_cfg = build_config(parse_args(["--device", "cpu", "--suite", "core"]))
    assert core.core_config(core_cfg).groups() == [
        (8192, 32000, "float32", "cross_entropy"),
        (256, 10, "float32", "cross_entropy"),
        (256, 10, "float32", "softmax"),
        (256, 10, "float32", "log_softmax"),
    ]


def test_linear_suite_records_goals_and_plot(tmp_path):
    from benchmarks import linear_ce

    doc = linear_ce.run_linear(
        tmp_path, [(64, 16, 100, "float32")], reps=2, memory=False, log=lambda *_: None
    )
    names = [r["impl"] for r in doc["records"]]
    assert names[:2] == ["softmax_ext", "linear + softmax_ext.cross_entropy"]
    assert all(r["median_ms"] > 0 and r["reps"] == 2 for r in doc["records"])
    goal = doc["goals"][0]
    assert goal["case"] == (64, 16, 100, "float32") and "time_ratio" in goal
    assert (tmp_path / linear_ce.JSON_NAME).exists() and (tmp_path / linear_ce.PLOT_NAME).exists()
    assert "| 64 x 16 -> 100, float32 | softmax_ext |" in linear_ce.markdown(doc)
    mem = linear_ce.measure_memory("softmax_ext", 64, 16, 100, "float32")
    assert set(mem) == {"peak_growth_bytes", "grad_bytes", "extra_bytes"}
    assert mem["grad_bytes"] == (64 * 16 + 100 * 16) * 4
    records = [
        {**r, "memory": {"extra_bytes": 10**5 if r["impl"] == "softmax_ext" else 10**6}}
        for r in doc["records"]
    ]
    (g,) = linear_ce.evaluate(records)
    assert g["memory_share"] == pytest.approx(10**5 / (64 * 100 * 4)) and g["memory_pass"] is False


@pytest.mark.skipif(
    not __import__("torch.distributed", fromlist=["x"]).is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_parallel_suite_counts_collectives_and_bytes(tmp_path):
    from benchmarks import parallel

    doc = parallel.run_parallel(tmp_path, [(64, 101)], reps=1, warmup=1, log=lambda *_: None)
    recs = {r["impl"]: r for r in doc["records"]}
    assert set(recs) == {"softmax_ext", "loss_parallel", parallel.REFERENCE}
    ext, lp = recs["softmax_ext"], recs["loss_parallel"]
    # the forward: one metadata all-gather, MAX then SUM; the backward: nothing
    assert ext["collectives"]["fwd"] == {"all_gather": 1, "all_reduce": 2}
    assert ext["collectives"]["bwd"] == {}
    # fp32 class indices: 4 bytes of MAX and 8 of SUM a row, plus the per-call metadata
    assert 12.0 <= ext["bytes_per_row"] < 12.0 + 256 / 64
    assert lp["bytes_per_row"] > 0 and lp["median_ms"] > 0 and ext["median_ms"] > 0
    (comp,) = doc["comparisons"]
    assert comp["loss_max_abs_diff"] < 1e-5 and comp["grad_max_abs_diff"] < 1e-6
    assert (tmp_path / parallel.JSON_NAME).exists()
    assert "| 64 x 101 | softmax_ext |" in parallel.markdown(doc)

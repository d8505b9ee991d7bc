"""Smoke tests of the benchmark harness (benchmarks/): a tiny sweep into a temporary folder, the
schema of results.json, and the pieces that need no timing (bytes model, targets, report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bandwidth, core, plots, report  # noqa: E402
from benchmarks.cli import main  # noqa: E402
from benchmarks.config import parse_shapes  # noqa: E402
from benchmarks.trainer_bench import command  # noqa: E402

SHAPES = [(64, 10), (32, 300)]
RECORD_FIELDS = {
    "op": str,
    "direction": str,
    "impl": str,
    "backend": str,
    "rows": int,
    "classes": int,
    "dtype": str,
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
            "fp32,bf16",
            "--reps",
            "2",
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
    got = {
        (r["op"], r["direction"], r["impl"], r["rows"], r["classes"], r["dtype"])
        for r in doc["records"]
    }
    want = {
        (op, d, impl, n, c, dt)
        for op in ("softmax", "log_softmax", "cross_entropy")
        for d in ("fwd", "bwd", "fwd+bwd")
        for impl in ("softmax_ext", "torch")
        for n, c in SHAPES
        for dt in ("float32", "bfloat16")
    }
    assert got == want
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


def test_cross_entropy_saves_o_of_n_for_backward(sweep):
    _, doc = sweep
    for r in doc["records"]:
        if r["op"] == "cross_entropy" and r["direction"] == "fwd+bwd":
            size = r["rows"] * r["classes"] * (4 if r["dtype"] == "float32" else 2)
            if r["impl"] == "softmax_ext":
                assert r["saved_bytes"] <= 64 * r["rows"] + 64, r
            else:  # torch keeps the log-probabilities
                assert r["saved_bytes"] >= size, r


def test_report_is_written(sweep):
    out, _ = sweep
    md = (out / "results.md").read_text()
    assert "vs torch" in md and "cross_entropy fwd+bwd" in md


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


def test_core_targets_from_records():
    def rec(impl, shape, ms, saved=None):
        return {
            "op": "cross_entropy",
            "direction": "fwd+bwd",
            "dtype": "float32",
            "rows": shape[0],
            "classes": shape[1],
            "impl": impl,
            "median_ms": ms,
            "saved_bytes": saved,
        }

    big, small = core.CORE_LARGE, core.CORE_SMALL
    records = [
        rec("softmax_ext", big, 100.0, 8192 * 4),
        rec("torch", big, 1200.0),
        rec("torch.compile", big, 250.0),
        rec("softmax_ext", small, 0.02),
        rec("torch", small, 0.01),
    ]
    copy_gbps = 2 * 8192 * 32000 * 4 / 1e9 / 0.06  # floor = 60 ms
    targets = core.evaluate(records, copy_gbps)
    verdicts = {t["name"].split(" at ")[0]: t["pass"] for t in targets["items"]}
    assert verdicts == {
        "speed-up vs torch eager": True,
        "speed-up vs torch.compile": False,
        "time / copy floor": True,
        "saved for backward per row": True,
        "time / torch eager time": False,
    }
    assert not targets["all_pass"]
    text = core.format_targets(targets, {"device": "cpu (x)", "threads": 2, "copy_gbps": 1.0})
    assert "FAIL" in text and "PASS" in text


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
    with pytest.raises(ValueError):
        parse_shapes("256by10")
    assert main(["--ops", "nope"]) == 2
    cmd = command("fused", Path("o"), 10, "data", torch.device("cpu"))
    assert cmd[1:5] == ["-m", "softmax_ext.train", "--loss", "fused"]

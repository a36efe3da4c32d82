"""benchmarks/gpu_check.sh: its CPU smoke mode end to end, and its report helper on synthetic out-dirs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import ModuleType

from tests.benchmarks.synthetic_runs import CANDS, TOPS, bench, esa, rc, report_module, sw, synthetic
from tests.realmodels import REPO

CHECK_IDS = ("1a", "1b", "2a", "2b", "2c", "3", "4", "5", "6a", "6b", "7", "8a", "8b", "9", "10")
PATH_IDS = ("5", "6a", "6b", "7", "8a", "8b", "9", "10")


def _table_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """``{check id: (status, rest of the row)}`` from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[0] in CHECK_IDS and parts[1] in ("PASS", "FAIL", "SKIP"):
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def test_cpu_only_smoke_mode_passes_every_check(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-only", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = _table_rows(proc.stdout)
    assert sorted(rows) == sorted(CHECK_IDS), proc.stdout
    for cid in ("1a", "2a", "3", "4", *PATH_IDS):
        assert rows[cid][0] == "PASS", (cid, rows[cid])
    for cid in ("1b", "2b", "2c"):
        assert rows[cid][0] == "SKIP" and "bf16" in rows[cid][1], (cid, rows[cid])
    # the table names the tolerance of each check and the peak memory of each run it read
    assert "every Top-K and perplexity equal" in rows["2a"][1] and "|ppl ratio - 1| <= 0.005" in rows["6a"][1]
    assert "peak memory MB: resume_killed" not in proc.stdout  # a killed run records no peak
    assert "peak memory MB: resume_dev RSS" in proc.stdout and "torchrun_dev RSS" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["mode"] == "cpu-only"
    assert [c["id"] for c in summary["checks"]] == list(CHECK_IDS)
    assert (out / "logs" / "resume_killed.rc").read_text().strip() == "137"  # really SIGKILLed
    fsdp = json.loads((out / "fsdp_dev" / "config.json").read_text())
    assert fsdp["config"]["shard"] == "fsdp"
    # everything stays in the output folder: the run out-dirs and logs, no leftover temp folder or model
    assert {"logs", "esa_dev_fp32", "esa_cpu_fp32", "esa_offload", "sw_dev", "sw_cpu_fp32", "multi_dev",
            "quant8_dev", "resume_dev", "torchrun_dev", "fsdp_dev", "evals_dev"} <= {p.name for p in out.iterdir()}
    assert not (out / "tmp").exists() and not (out / "tiny_model").exists()


# ---- the report helper on synthetic out-dirs (tests/benchmarks/synthetic_runs.py) -----------------------


def _statuses(report: ModuleType, out: Path, mode: str = "cpu-only") -> dict[str, str]:
    return {c.id: c.status for c in report.build_checks(out, mode)}


def test_report_passes_agreeing_runs_and_writes_summary(tmp_path, capsys):
    report = report_module()
    out = synthetic(tmp_path)
    assert report.main([str(out), "--mode", "cpu-only"]) == 0
    table = capsys.readouterr().out
    assert "PASS" in table and "FAIL" not in table.split("passed")[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["failed"] == []
    assert {c["id"]: c["status"] for c in summary["checks"]} == {
        **{cid: "PASS" for cid in CHECK_IDS}, "1b": "SKIP", "2b": "SKIP", "2c": "SKIP"}


def test_report_fails_a_different_top_k(tmp_path, capsys):
    report = report_module()
    out = synthetic(tmp_path)
    esa(out, "esa_offload", {0: [(5, 0.9), (7, 0.5), (12, 0.25)], 1: TOPS[1]})  # seed 0: one weight differs
    esa(out, "esa_cpu_fp32", {0: TOPS[0], 1: [(5, 0.8), (13, 0.4), (8, 0.3)]})  # seed 1: one weight differs
    statuses = _statuses(report, out)
    assert statuses["3"] == "FAIL" and statuses["2a"] == "FAIL" and statuses["1a"] == "PASS"
    check_2a = next(c for c in report.build_checks(out, "cpu-only") if c.id == "2a")
    assert check_2a.values["jaccard"] == {"0": 1.0, "1": 0.5}
    assert report.main([str(out), "--mode", "cpu-only"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["passed"] and summary["failed"] == ["2a", "3"]
    capsys.readouterr()


def test_report_fails_different_super_weights_a_failed_run_and_inexact_cpu_numbers(tmp_path):
    report = report_module()
    out = synthetic(tmp_path)
    sw(out, "sw_dev", CANDS[:1])
    rc(out, "bench_fp32", "2")
    esa(out, "esa_cpu_fp32", TOPS, ppl=20.0 * (1 + 1e-9))  # the CPU against itself must be exact
    checks = {c.id: c for c in report.build_checks(out, "cpu-only")}
    assert checks["4"].status == "FAIL" and checks["1a"].status == "FAIL" and checks["2a"].status == "FAIL"
    assert "exited 2" in checks["1a"].detail and "logs/bench_fp32.log" in checks["1a"].detail
    (out / "logs" / "esa_offload.rc").unlink()
    assert "did not run" in next(c for c in report.build_checks(out, "cpu-only") if c.id == "3").detail


def test_report_gpu_mode_tolerances_and_offload_split(tmp_path):
    report = report_module()
    out = synthetic(tmp_path)
    bench(out, "bench_bf16")
    split = {"model.embed_tokens": "0", "model.layers.0": "0", "model.layers.1": "cpu"}
    esa(out, "esa_dev_fp32", TOPS, device="cuda")
    esa(out, "esa_cpu_fp32", TOPS, ppl=20.0 * (1 + 1e-6))  # fp32 GPU vs CPU: rounding is allowed
    esa(out, "esa_dev_bf16", {0: TOPS[0], 1: [(5, 0.8), (13, 0.4), (8, 0.3)]}, ppl=20.2, device="cuda")
    nudged = {s: [(i, v * (1 + 1e-7)) for i, v in rows] for s, rows in TOPS.items()}
    esa(out, "esa_offload", nudged, device_map=split, device="cuda")
    assert set(_statuses(report, out, "gpu").values()) == {"PASS"}
    esa(out, "esa_offload", nudged, device_map={"": "0"}, device="cuda")  # the budget did not force CPU blocks
    assert _statuses(report, out, "gpu")["3"] == "FAIL"
    off = {s: [(i, v * (1 + 1e-3)) for i, v in rows] for s, rows in TOPS.items()}
    esa(out, "esa_offload", off, device_map=split, device="cuda")  # scores beyond rel 1e-5
    assert _statuses(report, out, "gpu")["3"] == "FAIL"
    esa(out, "esa_dev_bf16", TOPS, ppl=30.0, device="cuda")  # bf16 perplexity 50 % off: beyond the sanity bound
    assert _statuses(report, out, "gpu")["2b"] == "FAIL"


def test_script_rejects_unknown_options(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--bogus", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option" in proc.stderr

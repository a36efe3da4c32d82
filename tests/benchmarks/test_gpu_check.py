"""benchmarks/gpu_check.sh: its CPU smoke mode end to end, and its report helper on synthetic out-dirs."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.realmodels import REPO

CHECK_IDS = ("1a", "1b", "2a", "2b", "2c", "3", "4", "5")
PARAM = "model.layers.0.mlp.down_proj.weight"


def _report() -> ModuleType:
    """benchmarks/gpu_check_report.py (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check_report", REPO / "benchmarks" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
    for cid in ("1a", "2a", "3", "4"):
        assert rows[cid][0] == "PASS", (cid, rows[cid])
    for cid in ("1b", "2b", "2c"):
        assert rows[cid][0] == "SKIP" and "bf16" in rows[cid][1], (cid, rows[cid])
    assert rows["5"][0] == "SKIP" and "not implemented yet" in rows["5"][1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["mode"] == "cpu-only"
    assert [c["id"] for c in summary["checks"]] == list(CHECK_IDS)
    # everything stays in the output folder: the run out-dirs and logs, no leftover temp folder
    assert {"logs", "esa_dev_fp32", "esa_cpu_fp32", "esa_offload", "sw_dev", "sw_cpu_fp32"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "tmp").exists()


# ---- the report helper on synthetic out-dirs --------------------------------------------------------------


def _rc(out: Path, name: str, rc: str = "0") -> Path:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}.rc").write_text(rc + "\n")
    (out / name).mkdir(exist_ok=True)
    return out / name


def _esa(out: Path, name: str, tops: dict[int, list[tuple[int, float]]], ppl: float = 20.0,
         device_map: dict | None = None, device: str = "cpu") -> None:
    d = _rc(out, name)
    with open(d / "top_weights.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "parameter", "index", "coords", "score", "seed", "tensor_rank"])
        for seed, rows in tops.items():
            for rank, (index, score) in enumerate(rows, 1):
                w.writerow([rank, PARAM, index, f"0,{index}", f"{score:.9g}", seed, rank])
    per_seed = {str(s): {"top_k": {"ppl": ppl * 100}} for s in tops}
    (d / "perturbation_results.json").write_text(json.dumps({"baseline": {"ppl": ppl}, "per_seed": per_seed}))
    (d / "config.json").write_text(json.dumps({"resolved": {"device": device, "dtype": "fp32",
                                                            "device_map": device_map}}))


def _bench(out: Path, name: str) -> None:
    d = _rc(out, name)
    (d / "bench.json").write_text(json.dumps({"device": "cpu", "dtype": "fp32",
                                              "ratio": {"grad_x_weight": 1.03, "act_mag": 0.99},
                                              "peak_mb": {"forward_backward": 3740, "grad_x_weight": 3704,
                                                          "act_mag": 2194}}))


def _sw(out: Path, name: str, cands: list[tuple[int, int, int]]) -> None:
    d = _rc(out, name)
    (d / "super_weights.json").write_text(json.dumps({"candidates": [
        {"layer": layer, "row": row, "col": col} for layer, row, col in cands]}))


TOPS = {0: [(5, 0.9), (7, 0.5), (11, 0.25)], 1: [(5, 0.8), (13, 0.4), (7, 0.3)]}
CANDS = [(11, 507, 1229), (28, 507, 678)]


def _synthetic(out: Path) -> Path:
    """A cpu-only output folder whose every check passes."""
    _bench(out, "bench_fp32")
    for name in ("esa_dev_fp32", "esa_cpu_fp32", "esa_offload"):
        _esa(out, name, TOPS)
    _sw(out, "sw_dev", CANDS)
    _sw(out, "sw_cpu_fp32", CANDS)
    return out


def _statuses(report: ModuleType, out: Path, mode: str = "cpu-only") -> dict[str, str]:
    return {c.id: c.status for c in report.build_checks(out, mode)}


def test_report_passes_agreeing_runs_and_writes_summary(tmp_path, capsys):
    report = _report()
    out = _synthetic(tmp_path)
    assert report.main([str(out), "--mode", "cpu-only"]) == 0
    table = capsys.readouterr().out
    assert "PASS" in table and "FAIL" not in table.split("passed")[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["failed"] == []
    assert {c["id"]: c["status"] for c in summary["checks"]} == {
        "1a": "PASS", "1b": "SKIP", "2a": "PASS", "2b": "SKIP", "2c": "SKIP", "3": "PASS", "4": "PASS", "5": "SKIP"}


def test_report_fails_a_different_top_k(tmp_path, capsys):
    report = _report()
    out = _synthetic(tmp_path)
    _esa(out, "esa_offload", {0: [(5, 0.9), (7, 0.5), (12, 0.25)], 1: TOPS[1]})  # seed 0: one weight differs
    _esa(out, "esa_cpu_fp32", {0: TOPS[0], 1: [(5, 0.8), (13, 0.4), (8, 0.3)]})  # seed 1: one weight differs
    statuses = _statuses(report, out)
    assert statuses["3"] == "FAIL" and statuses["2a"] == "FAIL" and statuses["1a"] == "PASS"
    check_2a = next(c for c in report.build_checks(out, "cpu-only") if c.id == "2a")
    assert check_2a.values["jaccard"] == {"0": 1.0, "1": 0.5}
    assert report.main([str(out), "--mode", "cpu-only"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["passed"] and summary["failed"] == ["2a", "3"]
    capsys.readouterr()


def test_report_fails_different_super_weights_a_failed_run_and_inexact_cpu_numbers(tmp_path):
    report = _report()
    out = _synthetic(tmp_path)
    _sw(out, "sw_dev", CANDS[:1])
    _rc(out, "bench_fp32", "2")
    _esa(out, "esa_cpu_fp32", TOPS, ppl=20.0 * (1 + 1e-9))  # the CPU against itself must be exact
    checks = {c.id: c for c in report.build_checks(out, "cpu-only")}
    assert checks["4"].status == "FAIL" and checks["1a"].status == "FAIL" and checks["2a"].status == "FAIL"
    assert "exited 2" in checks["1a"].detail and "logs/bench_fp32.log" in checks["1a"].detail
    (out / "logs" / "esa_offload.rc").unlink()
    assert "did not run" in next(c for c in report.build_checks(out, "cpu-only") if c.id == "3").detail


def test_report_gpu_mode_tolerances_and_offload_split(tmp_path):
    report = _report()
    out = _synthetic(tmp_path)
    _bench(out, "bench_bf16")
    split = {"model.embed_tokens": "0", "model.layers.0": "0", "model.layers.1": "cpu"}
    _esa(out, "esa_dev_fp32", TOPS, device="cuda")
    _esa(out, "esa_cpu_fp32", TOPS, ppl=20.0 * (1 + 1e-6))  # fp32 GPU vs CPU: rounding is allowed
    _esa(out, "esa_dev_bf16", {0: TOPS[0], 1: [(5, 0.8), (13, 0.4), (8, 0.3)]}, ppl=20.2, device="cuda")
    nudged = {s: [(i, v * (1 + 1e-7)) for i, v in rows] for s, rows in TOPS.items()}
    _esa(out, "esa_offload", nudged, device_map=split, device="cuda")
    assert _statuses(report, out, "gpu") == {"1a": "PASS", "1b": "PASS", "2a": "PASS", "2b": "PASS", "2c": "PASS",
                                             "3": "PASS", "4": "PASS", "5": "SKIP"}
    _esa(out, "esa_offload", nudged, device_map={"": "0"}, device="cuda")  # the budget did not force CPU blocks
    assert _statuses(report, out, "gpu")["3"] == "FAIL"
    off = {s: [(i, v * (1 + 1e-3)) for i, v in rows] for s, rows in TOPS.items()}
    _esa(out, "esa_offload", off, device_map=split, device="cuda")  # scores beyond rel 1e-5
    assert _statuses(report, out, "gpu")["3"] == "FAIL"
    _esa(out, "esa_dev_bf16", TOPS, ppl=30.0, device="cuda")  # bf16 perplexity 50 % off: beyond the sanity bound
    assert _statuses(report, out, "gpu")["2b"] == "FAIL"


def test_script_rejects_unknown_options(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--bogus", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option" in proc.stderr

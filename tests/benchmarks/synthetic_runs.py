"""Synthetic output folders of benchmarks/gpu_check.sh: every run a check reads, written as the tool writes it
(only the fields the checks read), so each check can be shown to pass agreeing runs and fail a difference."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from tests.realmodels import REPO

PARAM = "model.layers.0.mlp.down_proj.weight"
MULTI_METRICS = ("grad_x_weight", "act_mag", "obs", "taylor2")


def report_module() -> ModuleType:
    """benchmarks/gpu_check_report.py (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check_report", REPO / "benchmarks" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rc(out: Path, name: str, status: str = "0") -> Path:
    """Run ``name``'s recorded exit status and its (empty) out-dir."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}.rc").write_text(status + "\n")
    (out / name).mkdir(exist_ok=True)
    return out / name


def esa(out: Path, name: str, tops: dict[int, list[tuple[int, float]]], ppl: float = 20.0,
        device_map: dict | None = None, device: str = "cpu", folder: Path | None = None) -> None:
    """An ESA out-dir (``folder``: write it there, e.g. a metric's folder of a multi-metric run)."""
    d = folder or rc(out, name)
    d.mkdir(parents=True, exist_ok=True)
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


def bench(out: Path, name: str) -> None:
    d = rc(out, name)
    (d / "bench.json").write_text(json.dumps({"device": "cpu", "dtype": "fp32",
                                              "ratio": {"grad_x_weight": 1.03, "act_mag": 0.99},
                                              "peak_mb": {"forward_backward": 3740, "grad_x_weight": 3704,
                                                          "act_mag": 2194}}))


def sw(out: Path, name: str, cands: list[tuple[int, int, int]]) -> None:
    d = rc(out, name)
    (d / "super_weights.json").write_text(json.dumps({"candidates": [
        {"layer": layer, "row": row, "col": col} for layer, row, col in cands]}))


TOPS = {0: [(5, 0.9), (7, 0.5), (11, 0.25)], 1: [(5, 0.8), (13, 0.4), (7, 0.3)]}
CANDS = [(11, 507, 1229), (28, 507, 678)]


def multi(out: Path, name: str, tops: dict[str, dict] | None = None) -> None:
    """A run of the four metrics of check 5: each metric's folder an ESA out-dir (``tops``: per metric)."""
    d = rc(out, name)
    for m in MULTI_METRICS:
        esa(out, name, (tops or {}).get(m, TOPS), folder=d / "metrics" / m)


def quant(out: Path, name: str, ratios: dict[str, float] | None = None) -> None:
    """quantization_results.json: one seed, block size ``channel``, three conditions."""
    ratios = ratios or {"none": 1.002, "protect_topk": 1.001, "protect_random_k": 1.0015}
    rows = {c: {"ppl": 20.0 * r, "ratio": r} for c, r in ratios.items()}
    (rc(out, name) / "quantization_results.json").write_text(json.dumps({"per_seed": {"0": {"channel": rows}}}))


def evals(out: Path, name: str, acc: float = 0.5, layer_max: float = 3.0, massive: list | None = None) -> None:
    """task_results.json (arc_easy, baseline and top_k) and activations.json (two layers)."""
    d = rc(out, name)
    rec = {"arc_easy": {"acc": acc, "acc_norm": acc, "items": 20}}
    (d / "task_results.json").write_text(json.dumps({"baseline": rec, "experiments": {"perturbation": {
        "per_seed": {"0": {"20": {"top_k": rec}}}}}}))
    sites = [{"layer": layer, "channel": ch} for layer, ch in (massive or [])]
    record = {"n_massive": len(sites), "massive": sites,
              "layers": [{"layer": 0, "max": 1.0}, {"layer": 1, "max": layer_max}]}
    (d / "activations.json").write_text(json.dumps({"baseline": record, "conditions": [
        {**record, "seed": 0, "condition": "top_k"}]}))


def synthetic(out: Path) -> Path:
    """A cpu-only output folder whose every check passes."""
    bench(out, "bench_fp32")
    for name in ("esa_dev_fp32", "esa_cpu_fp32", "esa_offload", "resume_dev", "torchrun_dev", "fsdp_dev"):
        esa(out, name, TOPS)
    rc(out, "resume_killed", "137")
    sw(out, "sw_dev", CANDS)
    sw(out, "sw_cpu_fp32", CANDS)
    for name in ("multi_dev", "multi_cpu_fp32"):
        multi(out, name)
    for name in ("quant8_dev", "quant4_dev", "quant4_cpu_fp32"):
        quant(out, name)
    for name in ("evals_dev", "evals_cpu_fp32"):
        evals(out, name, massive=[(1, 7)])
    return out

"""Data parallel: 2 CPU processes (gloo) give the scores, Top-K and perplexities of one process."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

import esa_runner
from esa.metrics import METRICS, MetricContext, compute_scores
from esa.model import distributed
from esa.model.forward import perplexity
from esa.model.targets import find_targets
from tests.conftest import N_WINDOWS, VOCAB, WINDOW_LEN, make_gpt2, make_llama
from tests.model.ranks import main_only_worker
from tests.realmodels import CORPUS, REPO, tiny_model_dir

GRADIENT_METRICS = [m for m in METRICS if m != "magnitude"]


def _windows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (N_WINDOWS + 1, WINDOW_LEN), generator=gen)  # 7: uneven shares


def _all_scores(model_name: str) -> dict:
    model = {"llama": make_llama, "gpt2": make_gpt2}[model_name]()
    targets = find_targets(model)
    windows = _windows()
    out = {m: compute_scores(m, model, targets, windows, 2, MetricContext(seed=3, hutchinson_samples=2,
                                                                          curvature_samples=2))
           for m in GRADIENT_METRICS}
    out["ppl"] = perplexity(model, windows, 2)
    return out


def _worker(rank: int, store: str, model_name: str, dest: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        assert distributed.active() and distributed.world_size() == 2
        res = _all_scores(model_name)
        if rank == 0:
            torch.save(res, dest)
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_every_metric_sharded_over_two_ranks_equals_one_process(tmp_path, single_thread, model_name):
    dest = tmp_path / "ranks.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), model_name, str(dest)), nprocs=2, join=True)
    two = torch.load(dest)
    one = _all_scores(model_name)
    for metric in GRADIENT_METRICS:
        assert one[metric].keys() == two[metric].keys()
        for name, s in one[metric].items():
            # the same sums in another order: equal to fp32 rounding, and far from a missing share
            torch.testing.assert_close(two[metric][name], s, rtol=2e-5, atol=1e-7 * float(s.abs().max()),
                                       msg=f"{metric} {name}")
    assert two["ppl"]["tokens"] == one["ppl"]["tokens"] == (N_WINDOWS + 1) * (WINDOW_LEN - 1)
    assert two["ppl"]["ppl"] == pytest.approx(one["ppl"]["ppl"], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_args(model_dir: Path, out: Path) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
            "--metric", "grad_x_weight", "--mode", "global", "--topk", "6", "--perturb", "sign_flip",
            "--seeds", "0,1", "--stability-check", "--max-length", "24", "--max-samples", "5",
            "--eval-samples", "5", "--batch-size", "2", "--out-dir", str(out)]


def _top_rows(out: Path) -> list[dict]:
    with open(out / "top_weights.csv") as f:
        return list(csv.DictReader(f))


def test_cli_under_torchrun_with_two_gloo_ranks_matches_one_process(tmp_path_factory, tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    one, two = tmp_path / "one", tmp_path / "two"
    assert esa_runner.main(_run_args(model_dir, one)) == 0
    printed = capsys.readouterr().out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           str(REPO / "esa_runner.py"), *_run_args(model_dir, two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone printed the summary (the same table, once)
    assert proc.stdout.count("random_k") == printed.count("random_k") > 0
    r1, r2 = _top_rows(one), _top_rows(two)
    assert [(r["seed"], r["rank"], r["parameter"], r["index"]) for r in r1] == \
           [(r["seed"], r["rank"], r["parameter"], r["index"]) for r in r2]
    for a, b in zip(r1, r2):
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-5)
    p1 = json.loads((one / "perturbation_results.json").read_text())
    p2 = json.loads((two / "perturbation_results.json").read_text())
    assert p1["baseline"]["tokens"] == p2["baseline"]["tokens"]
    for seed in ("0", "1"):
        for cond, row in p1["per_seed"][seed].items():
            assert p2["per_seed"][seed][cond]["ppl"] == pytest.approx(row["ppl"], rel=1e-6), (seed, cond)
    manifest = json.loads((two / "experiment_manifest.json").read_text())
    assert manifest["status"] == "success" and manifest["world_size"] == 2
    s1 = json.loads((one / "stability_summary.json").read_text())
    s2 = json.loads((two / "stability_summary.json").read_text())
    assert s1["jaccard_mean"] == s2["jaccard_mean"]


def test_device_map_with_torchrun_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert esa_runner.main(["--device", "cpu", "--device-map", "auto", "--dry-run"]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_from_main_computes_on_rank_0_and_every_rank_gets_the_result_or_the_error(tmp_path):
    """The tasks evaluator's pattern under torchrun: rank 0 runs lm-eval, the others wait for its record;
    a usage error there is the same usage error on every rank (exit 2), a crash is a crash everywhere."""
    dest = str(tmp_path / "out")
    mp.spawn(main_only_worker, args=(str(tmp_path / "store"), dest), nprocs=2, join=True)
    zero, one = torch.load(f"{dest}.0"), torch.load(f"{dest}.1")
    assert zero["value"] == one["value"] == {"acc": 0.25, "rank": 0}
    assert zero["usage"] == one["usage"] == "--tasks-dir lacks piqa"
    assert (zero["crash"], one["crash"]) == ("KeyError", "RuntimeError")
    assert zero["after"] == one["after"] == [2.0]

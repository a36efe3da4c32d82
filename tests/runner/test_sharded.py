"""--shard fsdp end to end: torchrun with 1, 2 and 4 CPU processes (gloo) gives the single process's
Top-K, controls and perturbation results on tiny Llama, MoE (qwen3_moe) and GPT-2 models, for
per_layer, per_row and global, with two metrics, a sweep and two seeds; bad inputs are exit 2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import esa_runner
from tests.model_families import family_dir
from tests.realmodels import REPO
from tests.runner.sharded_driver import CONFIGS, FAMILIES, argv

pytestmark = pytest.mark.usefixtures("single_thread")
REL = 1e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        family_dir(family, root / family)
    return root


@pytest.fixture(scope="module")
def single(models, tmp_path_factory):
    """Every configuration run by one plain process."""
    root = tmp_path_factory.mktemp("single")
    for runs in CONFIGS.values():
        for name, (family, mode) in runs.items():
            assert esa_runner.main(argv(models / family, mode, root / name)) == 0, name
    return root


def top_rows(out) -> list[dict]:
    with open(out / "top_weights.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def selections(out, seed: int) -> dict[str, np.ndarray]:
    with np.load(out / "checkpoints" / f"seed_{seed}.npz") as z:
        return {k: z[k] for k in z.files if k.endswith("/indices")}


def close(a, b, scale: float | None = None) -> bool:
    """Equal, floats within REL of the larger (or of ``scale``: a tensor's largest score, for its small
    statistics, whose fp32 sums round differently when the ranks add them in another order)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], scale) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, scale) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= REL * (scale if scale is not None else max(abs(a), abs(b)))
    return a == b


def close_results(a: dict, b: dict) -> bool:
    """perturbation_results.json: perplexities within REL; what is computed from two of them (delta_ppl
    and its statistics, ratios and theirs) within REL of the baseline perplexity (or of 1, for a ratio):
    a delta of two perplexities ~1e5 that agree to 1e-7 agrees to ~1e-2, which is not a relative 1e-6.
    The ranks run other batch shapes (4 ranks, 3 windows: one window per rank), so fp32 matmuls round
    differently, as with any batch size."""
    base = a["baseline"]["ppl"]

    def walk(x, y, key: str) -> bool:
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(walk(x[k], y[k], k) for k in x)
        if isinstance(x, list):
            return len(x) == len(y) and all(walk(u, v, key) for u, v in zip(x, y))
        scale = base if key.startswith("delta_ppl") else 1.0 if key.startswith("ratio") else None
        return close(x, y, scale)
    return walk(a["per_seed"], b["per_seed"], "") and walk(a["sweep"], b["sweep"], "")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_runs_equal_the_single_process(models, single, tmp_path, world):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(REPO / "tests" / "runner" / "sharded_driver.py"), str(tmp_path),
                           str(models)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in CONFIGS[world]:
        for metric in ("grad_x_weight", "act_mag"):
            a, b = single / name / "metrics" / metric, tmp_path / name / "metrics" / metric
            # the same weights; fp32 gradient sums round differently when the ranks add them (and FSDP's
            # gathered weights multiply in another memory layout): a score is within REL of its tensor's
            # largest score, so two weights whose scores differ in the last bit may swap places in the
            # listing (its order, not its content, may differ)
            ra, rb = (sorted(top_rows(x), key=lambda r: (r["seed"], r["parameter"], int(r["index"]))) for x in (a, b))
            assert [(r["seed"], r["parameter"], r["index"]) for r in ra] == [
                (r["seed"], r["parameter"], r["index"]) for r in rb], (name, metric)
            stats = json.loads((a / "sensitivity_stats.json").read_text())["tensors"]
            largest = {n: st["max"] for n, st in stats.items()}
            assert all(close(float(x["score"]), float(y["score"]), largest[x["parameter"]])
                       for x, y in zip(ra, rb)), (name, metric)
            swapped = [(x, y) for x, y in zip(ra, rb) if x["rank"] != y["rank"]]
            assert len(swapped) <= len(ra) // 20, (name, metric, len(swapped))  # ties only, not a reordering
            for seed in (0, 1):  # every control of every k: the same weights
                sa, sb = selections(single / name, seed), selections(tmp_path / name, seed)
                assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa), (name, seed)
            pa = json.loads((a / "perturbation_results.json").read_text())
            pb = json.loads((b / "perturbation_results.json").read_text())
            assert close_results(pa, pb), (name, metric)
            sta = json.loads((a / "sensitivity_stats.json").read_text())["tensors"]
            stb = json.loads((b / "sensitivity_stats.json").read_text())["tensors"]
            for tensor, st in sta.items():  # quantiles exact up to the scores' own rounding
                shares = st.pop("top_share")
                assert close(shares, stb[tensor].pop("top_share")), (name, metric, tensor)
                assert close(st, stb[tensor], scale=st["max"]), (name, metric, tensor)
        agreement = [json.loads((root / name / "metric_agreement.json").read_text()) for root in (single, tmp_path)]
        assert close(*agreement)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["resolved"]["world_size"] == world and config["config"]["shard"] == "fsdp"
        assert config["fingerprints"]["model_weights"] == json.loads(
            (single / name / "config.json").read_text())["fingerprints"]["model_weights"]


@pytest.mark.parametrize("extra, needle", [
    (["--shard", "fsdp"], "--shard fsdp needs torchrun"),
    (["--shard", "fsdp", "--device-map", "auto"], "cannot be combined with --device-map"),
])
def test_bad_shard_flags_exit_2(extra, needle, capsys):
    assert esa_runner.main(["--dry-run", "--device", "cpu", *extra]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("metric", ["grad_squared", "taylor2", "hessian_diag", "hutchinson_diag"])
def test_a_metric_that_cannot_run_on_shards_is_named(metric, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert esa_runner.main(["--dry-run", "--device", "cpu", "--shard", "fsdp", "--metric", metric]) == 2
    assert f"--shard fsdp cannot score with {metric}" in capsys.readouterr().err

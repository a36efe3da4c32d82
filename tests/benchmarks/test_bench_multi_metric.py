"""benchmarks/bench_multi_metric.py: its pass counting on a tiny model, its bounds and its exit verdict."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

import esa_runner
from esa.metrics import passes
from tests.realmodels import CORPUS, REPO, tiny_model_dir


def _bench() -> ModuleType:
    """benchmarks/bench_multi_metric.py (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_multi_metric", REPO / "benchmarks" / "bench_multi_metric.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def _argv(tiny: str, out, metric: str) -> list[str]:
    return ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS), "--max-length", "16",
            "--max-samples", "2", "--eval-samples", "1", "--batch-size", "1", "--topk", "3", "--seeds", "0,1",
            "--metric", metric, "--out-dir", str(out)]


def test_each_kind_of_pass_is_counted_once_per_seed_and_put_back(tiny, tmp_path):
    bench = _bench()
    forward, window = passes.forward_pass, passes.window_pass
    with bench.counting_passes() as counts:
        assert esa_runner.main(_argv(tiny, tmp_path / "multi", "grad_x_weight,act_mag,obs,taylor2,magnitude")) == 0
    # two seeds: one shared forward+backward (act_mag and obs observe it) and one per-window pass each
    assert dict(counts) == {"batch forward+backward": 2, "window forward+backward": 2}
    with bench.counting_passes() as counts:
        assert esa_runner.main(_argv(tiny, tmp_path / "obs", "obs") + ["--seeds", "0,1,2"]) == 0
    assert dict(counts) == {"batch forward": 3}  # an observer alone: a forward without backward
    assert (passes.forward_pass, passes.window_pass) == (forward, window)


def test_a_metric_s_own_run_leaves_out_the_control_it_cannot_have():
    bench = _bench()
    flags = ["--perturb", "zero", "--controls", "random_k,magnitude_matched", "--seeds", "0"]
    assert bench.for_metric("magnitude", flags) == ["--perturb", "zero", "--controls", "random_k", "--seeds", "0"]
    assert bench.for_metric("obs", flags) == ["--perturb", "zero", "--controls", "random_k,random_mag_k", "--seeds",
                                              "0"]
    assert bench.seed_count(flags) == 1 and bench.seed_count(["--seeds", "0,1,2"]) == 3


def _run(metric: str, wall: float, scoring: float, n: int = 2) -> dict:
    return {"metric": metric, "wall_s": wall, "phases_s": {"scoring": scoring, "evaluation": 1.0},
            "passes": {"batch forward+backward": n}, "peak_rss_mb": 100.0}


def test_verdict_enforces_both_bounds_the_pass_counts_and_equal_results():
    bench = _bench()
    singles = {"a": _run("a", 10.0, 4.0), "b": _run("b", 10.0, 4.0)}
    same = {"a": {"top_weights.csv": True}, "b": {"top_weights.csv": True}}
    ok = bench.verdict(singles, _run("a,b", 13.9, 5.2), 2, same)
    assert ok["failures"] == [] and ok["ratio_wall"] == pytest.approx(13.9 / 20) and \
        ok["ratio_scoring"] == pytest.approx(5.2 / 8)
    assert "PASS" in bench.table(singles, _run("a,b", 13.9, 5.2), ok)
    bad = bench.verdict(singles, _run("a,b", 14.1, 5.3, n=4), 2, {**same, "b": {"top_weights.csv": False}})
    assert len(bad["failures"]) == 4
    assert any("scoring 0.66x" in f for f in bad["failures"]) and any("wall time 0.70x" in f for f in bad["failures"])
    assert any("batch forward+backward: 4 in the multi-metric run" in f for f in bad["failures"])
    assert "b: top_weights.csv differs from its own run" in bad["failures"]
    assert "FAIL: " in bench.table(singles, _run("a,b", 14.1, 5.3, n=4), bad)
    # an observer's forward alone in its own run rides the gradient metric's forward+backward: no failure;
    # a per-window pass of a single run that the multi-metric run lacks is one
    singles["b"]["passes"] = {"batch forward": 2, "window forward+backward": 2}
    lacking = bench.verdict(singles, _run("a,b", 13.9, 5.2), 2, same)["failures"]
    assert lacking == ["window forward+backward: missing from the multi-metric run"]

"""Checks 5-10 of benchmarks/gpu_check.sh (benchmarks/gpu_check_paths.py) on synthetic output folders:
each passes agreeing runs and fails the difference it exists to catch, at the tolerance of its mode."""

from __future__ import annotations

from tests.benchmarks.synthetic_runs import TOPS, esa, evals, multi, quant, rc, report_module, synthetic


def _checks(out, mode: str = "cpu-only") -> dict:
    return {c.id: c for c in report_module().build_checks(out, mode)}


def test_multi_metric_check_compares_each_metric(tmp_path):
    out = synthetic(tmp_path)
    assert _checks(out)["5"].status == "PASS"
    other = {0: [(5, 0.9), (7, 0.5), (12, 0.25)], 1: TOPS[1]}
    multi(out, "multi_dev", {"obs": other})  # one weight of obs's seed-0 Top-K differs
    check = _checks(out)["5"]
    assert check.status == "FAIL" and "obs FAIL" in check.detail and "taylor2 PASS" in check.detail
    assert check.values["obs"]["jaccard"] == {"0": 0.5, "1": 1.0}
    assert _checks(out, "gpu")["5"].status == "PASS"  # bf16 vs fp32: Jaccard 0.5 is within the sanity bound


def test_quantization_checks(tmp_path):
    out = synthetic(tmp_path)
    assert _checks(out)["6a"].status == "PASS" and _checks(out)["6b"].status == "PASS"
    quant(out, "quant8_dev", {"none": 1.004, "protect_topk": 0.994, "protect_random_k": 1.0})  # -0.6 %: beyond 0.5
    check = _checks(out)["6a"]
    assert check.status == "FAIL" and "-6.00e-03" in check.detail and "protect_topk" in check.detail
    quant(out, "quant4_dev", {"none": 1.002 * 1.01, "protect_topk": 1.001, "protect_random_k": 1.0015})
    check = _checks(out)["6b"]
    assert check.status == "FAIL" and "none:" in check.detail  # the CPU against itself: exact
    assert _checks(out, "gpu")["6b"].status == "PASS"  # 1 % on a GPU in bf16: within 5e-2
    quant(out, "quant4_dev", {"none": 1.002, "protect_topk": 1.1, "protect_random_k": 1.0015})
    assert _checks(out, "gpu")["6b"].status == "FAIL"


def test_resume_check_needs_a_killed_first_run_and_the_same_answer(tmp_path):
    out = synthetic(tmp_path)
    assert _checks(out)["7"].status == "PASS"
    rc(out, "resume_killed", "0")  # the fault point never fired: nothing was resumed
    assert _checks(out)["7"].status == "FAIL" and "not SIGKILLed" in _checks(out)["7"].detail
    rc(out, "resume_killed", "137")
    esa(out, "resume_dev", TOPS, ppl=20.0 * (1 + 1e-9))  # the resumed run's baseline differs in the 9th digit
    assert _checks(out)["7"].status == "FAIL" and "perplexities differ" in _checks(out)["7"].detail


def test_torchrun_and_fsdp_checks(tmp_path):
    out = synthetic(tmp_path)
    assert _checks(out)["8a"].status == "PASS" and _checks(out)["8b"].status == "PASS"
    assert "gloo" in _checks(out)["8a"].title and "nccl" in _checks(out, "gpu")["8a"].title
    esa(out, "fsdp_dev", {0: TOPS[0], 1: [(5, 0.8), (13, 0.4), (8, 0.3)]})
    assert _checks(out)["8b"].status == "FAIL" and "different Top-K" in _checks(out)["8b"].detail
    rc(out, "torchrun_dev", "1")
    assert _checks(out)["8a"].status == "FAIL" and "exited 1" in _checks(out)["8a"].detail


def test_tasks_and_activations_checks(tmp_path):
    out = synthetic(tmp_path)
    assert _checks(out)["9"].status == "PASS" and _checks(out)["10"].status == "PASS"
    evals(out, "evals_dev", acc=0.55, layer_max=3.06, massive=[(1, 7)])
    cpu, gpu = _checks(out), _checks(out, "gpu")
    assert cpu["9"].status == "FAIL" and cpu["10"].status == "FAIL"  # cpu-only: exact
    assert gpu["9"].status == "PASS" and gpu["10"].status == "PASS"  # bf16: 0.05 accuracy, 2 % of max |h|
    evals(out, "evals_dev", acc=0.65, layer_max=3.3, massive=[(1, 8)])
    gpu = _checks(out, "gpu")
    assert gpu["9"].status == "FAIL" and gpu["9"].values["max_abs_diff"] == 0.65 - 0.5
    assert gpu["10"].status == "FAIL" and gpu["10"].values["differ"] == ["baseline", "s0 top_k"]


def test_table_lists_the_tolerance_and_peak_memory_of_each_run(tmp_path):
    out = synthetic(tmp_path)
    (out / "torchrun_dev" / "experiment_manifest.json").write_text(
        '{"peak_memory": {"rss_peak_mb": 812.4, "cuda_peak_mb": 1536.2}}')
    report = report_module()
    table = report.render(report.build_checks(out, "gpu"), out)
    row = next(line for line in table.splitlines() if line.startswith("8a "))
    assert "same Top-K, scores and perplexities rel <= 1e-05" in row
    memory = table.splitlines()[table.splitlines().index(row) + 1]
    assert memory.strip() == "peak memory MB: torchrun_dev CUDA 1536"

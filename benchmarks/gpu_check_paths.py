"""The checks of ``benchmarks/gpu_check.sh`` beyond scoring, offload and the detector (checks 5-10).

Runs read (each under the output folder, see :mod:`gpu_check_common`); ``dev`` = cuda bf16 on a GPU,
cpu fp32 in ``--cpu-only`` (where every comparison must then be exact):

* ``multi_dev``, ``multi_cpu_fp32``: ``--metric grad_x_weight,act_mag,obs,taylor2`` (5: Top-K per metric);
* ``quant8_dev``: ``--quantize rtn --bits 8`` (6a: every condition within 0.5 % of the unquantized
  model); ``quant4_dev``, ``quant4_cpu_fp32``: ``--bits 4`` (6b: each condition's ratio to the
  unquantized model, device against cpu fp32; ``--quantize`` cannot share a run with ``--perturb``);
* ``resume_killed`` (SIGKILLed at an evaluation, exit 137) and ``resume_dev`` (``--resume`` of the same
  out-dir) against ``esa_dev_fp32`` (7);
* ``torchrun_dev`` (``torchrun --nproc_per_node 1``: nccl on cuda, gloo on cpu) and ``fsdp_dev``
  (``--shard fsdp``, one rank) against ``esa_dev_fp32`` (8a, 8b);
* ``evals_dev``, ``evals_cpu_fp32``: ``--eval-tasks`` with a small ``--tasks-limit`` and the
  ``activations`` evaluator (9: accuracy per task and condition; 10: the residual stream's largest
  |value| per layer and the massive activations).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gpu_check_common import FAIL, PASS, Check, RunMissing, pair_check, read_json, rel_diff, run_dir, same_run_check

MULTI_METRICS = ("grad_x_weight", "act_mag", "obs", "taylor2")
QUANT8_MAX = 0.005  # 8-bit RTN: every condition's perplexity within 0.5 % of the unquantized model's
QUANT4_RTOL = 5e-2  # 4-bit, bf16 weights vs fp32 weights: each condition's ratio to the unquantized model
TASK_ACC_ATOL = 0.1  # bf16 vs fp32 accuracy on a few items: a near-tie may flip (0.1 = 2 of 20 items)
ACT_RTOL = 5e-2  # bf16 vs fp32: the largest |residual-stream value| of each layer


def _levels(cpu_only: bool) -> tuple[str, str]:
    """(comparison level, what runs on the device) of this mode."""
    return ("exact", "cpu fp32") if cpu_only else ("bf16", "cuda bf16")


def multi_check(out: Path, cpu_only: bool) -> Check:
    """5: one run of four metrics on the device against the same on cpu fp32, metric by metric."""
    level, dev = _levels(cpu_only)
    runs = ("multi_dev", "multi_cpu_fp32")
    title = f"--metric {','.join(MULTI_METRICS)}: {dev} vs cpu fp32, per metric"
    try:
        da, db = (run_dir(out, r) for r in runs)
    except RunMissing as e:
        return Check("5", title, FAIL, str(e), runs=runs)
    per = {m: pair_check("5", title, da / "metrics" / m, db / "metrics" / m, level, runs) for m in MULTI_METRICS}
    status = PASS if all(c.status == PASS for c in per.values()) else FAIL
    detail = "; ".join(f"{m} {c.status}: {c.detail}" for m, c in per.items())
    return Check("5", title, status, detail, {m: c.values for m, c in per.items()}, per[MULTI_METRICS[0]].tolerance,
                 runs)


def _quant_rows(run: Path) -> dict[tuple[str, str, str], float]:
    """``{(seed, block size, condition): ratio to the unquantized model}`` of quantization_results.json."""
    res = read_json(run / "quantization_results.json")
    return {(s, b, c): float(row["ratio"]) for s, blocks in res["per_seed"].items() for b, conds in blocks.items()
            for c, row in conds.items()}


def _compared(out: Path, failed: Check, read: Callable[[Path], dict], diff: Callable[[float, float], float]
              ) -> tuple[dict, dict, float, tuple] | Check:
    """``read`` of both runs of ``failed.runs`` (device, reference), and the key whose values ``diff`` the
    most with that difference: ``(a, b, difference, key)``; ``failed`` with the reason when a run is
    missing or the two do not hold the same keys (conditions, seeds, tasks...)."""
    try:
        a, b = (read(run_dir(out, r)) for r in failed.runs)
    except RunMissing as e:
        failed.detail = str(e)
        return failed
    if a.keys() != b.keys() or not a:
        failed.detail = "different (or no) conditions, seeds, block sizes or tasks"
        return failed
    worst = max(a, key=lambda k: diff(a[k], b[k]))
    return a, b, diff(a[worst], b[worst]), worst


def quant8_check(out: Path, cpu_only: bool) -> Check:
    """6a: 8-bit RTN changes perplexity by at most 0.5 % in every condition."""
    title = f"--quantize rtn --bits 8 on {_levels(cpu_only)[1]}: every condition vs unquantized"
    tol = f"|ppl ratio - 1| <= {QUANT8_MAX} in every condition"
    try:
        rows = _quant_rows(run_dir(out, "quant8_dev"))
    except RunMissing as e:
        return Check("6a", title, FAIL, str(e), tolerance=tol, runs=("quant8_dev",))
    worst = max(rows, key=lambda k: abs(rows[k] - 1.0))
    ok = bool(rows) and abs(rows[worst] - 1.0) <= QUANT8_MAX
    return Check("6a", title, PASS if ok else FAIL,
                 f"{len(rows)} conditions; largest change {rows[worst] - 1.0:+.2e} (seed {worst[0]}, block "
                 f"{worst[1]}, {worst[2]})", {"ratios": {"|".join(k): v for k, v in rows.items()}}, tol,
                 ("quant8_dev",))


def quant4_check(out: Path, cpu_only: bool) -> Check:
    """6b: 4-bit RTN on the device against cpu fp32, condition by condition."""
    dev = _levels(cpu_only)[1]
    rtol = 0.0 if cpu_only else QUANT4_RTOL
    title, runs = f"--quantize rtn --bits 4: {dev} vs cpu fp32", ("quant4_dev", "quant4_cpu_fp32")
    tol = f"each condition's ppl ratio rel <= {rtol:.0e}" if rtol else "every ppl ratio equal"
    res = _compared(out, Check("6b", title, FAIL, "", tolerance=tol, runs=runs), _quant_rows, rel_diff)
    if isinstance(res, Check):
        return res
    a, b, worst, key = res
    return Check("6b", title, PASS if worst <= rtol else FAIL,
                 f"{len(a)} conditions; largest ratio rel diff {worst:.1e} ({key[2]}: {a[key]:.4g} vs {b[key]:.4g})",
                 {"max_rel_diff": worst}, tol, runs)


def resume_check(out: Path, cpu_only: bool) -> Check:
    """7: a run SIGKILLed during its evaluations and resumed gives the uninterrupted run's answer."""
    dev = "cpu" if cpu_only else "cuda"
    title = f"SIGKILLed on {dev} fp32, --resume: vs the uninterrupted run"
    rc = out / "logs" / "resume_killed.rc"
    killed = rc.is_file() and rc.read_text().strip() == "137"
    check = same_run_check(out, "7", title, ("resume_dev", "esa_dev_fp32"), exact=cpu_only)
    check.runs = ("resume_killed", *check.runs)
    if not killed:
        check.status = FAIL
        check.detail = ("the first run was not SIGKILLed (exit " + (rc.read_text().strip() if rc.is_file()
                                                                    else "missing") + ", need 137) | " + check.detail)
    return check


def distributed_checks(out: Path, cpu_only: bool) -> list[Check]:
    """8a, 8b: torchrun with one rank, plain and --shard fsdp, against the plain device run."""
    dev, backend = ("cpu", "gloo") if cpu_only else ("cuda", "nccl")
    return [same_run_check(out, "8a", f"torchrun --nproc_per_node 1 ({backend}) vs plain {dev} fp32",
                           ("torchrun_dev", "esa_dev_fp32"), exact=cpu_only),
            same_run_check(out, "8b", f"torchrun --shard fsdp, 1 rank ({backend}) vs plain {dev} fp32",
                           ("fsdp_dev", "esa_dev_fp32"), exact=cpu_only)]


def _task_accuracy(run: Path) -> dict[tuple[str, str, str], float]:
    """``{(condition, task, metric): accuracy}`` of task_results.json (the baseline and every condition)."""
    res = read_json(run / "task_results.json")
    out = {("baseline", t, m): float(v) for t, rec in res["baseline"].items() for m, v in rec.items()
           if m in ("acc", "acc_norm")}
    for exp in res.get("experiments", {}).values():
        for seed, groups in exp["per_seed"].items():
            for conds in groups.values():
                for c, tasks in conds.items():
                    out.update({(f"s{seed} {c}", t, m): float(v) for t, rec in tasks.items() for m, v in rec.items()
                                if m in ("acc", "acc_norm")})
    return out


def tasks_check(out: Path, cpu_only: bool) -> Check:
    """9: --eval-tasks accuracy on the device against cpu fp32, per condition and task."""
    atol = 0.0 if cpu_only else TASK_ACC_ATOL
    title, runs = f"--eval-tasks: {_levels(cpu_only)[1]} vs cpu fp32", ("evals_dev", "evals_cpu_fp32")
    tol = f"|accuracy difference| <= {atol} per task and condition" if atol else "every accuracy equal"
    res = _compared(out, Check("9", title, FAIL, "", tolerance=tol, runs=runs), _task_accuracy,
                    lambda x, y: abs(x - y))
    if isinstance(res, Check):
        return res
    a, _, worst, key = res
    baseline = ", ".join(f"{t} {m} {v:.3f}" for (c, t, m), v in a.items() if c == "baseline")
    return Check("9", title, PASS if worst <= atol else FAIL,
                 f"{len(a)} accuracies; baseline {baseline}; largest difference {worst:.3f} ({' '.join(key)})",
                 {"max_abs_diff": worst}, tol, runs)


def activations_check(out: Path, cpu_only: bool) -> Check:
    """10: the activations evaluator on the device against cpu fp32: per layer the largest |value| of
    the residual stream, and where the massive activations are (layer, channel), baseline and conditions."""
    rtol = 0.0 if cpu_only else ACT_RTOL
    title, runs = f"activations evaluator: {_levels(cpu_only)[1]} vs cpu fp32", ("evals_dev", "evals_cpu_fp32")
    tol = (f"per-layer max |h| rel <= {rtol:.0e}, same massive (layer, channel)" if rtol
           else "every per-layer max |h| and massive activation equal")
    try:
        a, b = (read_json(run_dir(out, r) / "activations.json") for r in runs)
    except RunMissing as e:
        return Check("10", title, FAIL, str(e), tolerance=tol, runs=runs)
    records = [("baseline", a["baseline"], b["baseline"])]
    records += [(f"s{x['seed']} {x['condition']}", x, y) for x, y in zip(a["conditions"], b["conditions"])]
    worst, moved = 0.0, []
    for name, x, y in records:
        worst = max([worst, *(rel_diff(lx["max"], ly["max"]) for lx, ly in zip(x["layers"], y["layers"]))])
        sites = [{(m["layer"], m["channel"]) for m in r["massive"]} for r in (x, y)]
        if sites[0] != sites[1] or len(x["layers"]) != len(y["layers"]):
            moved.append(name)
    ok = worst <= rtol and not moved and len(a["conditions"]) == len(b["conditions"])
    n_massive = a["baseline"]["n_massive"]
    detail = (f"{len(records)} records; baseline {n_massive} massive activation(s); max per-layer |h| rel diff "
              f"{worst:.1e}" + (f"; massive sites differ in {', '.join(moved)}" if moved else ""))
    return Check("10", title, PASS if ok else FAIL, detail, {"max_rel_diff": worst, "differ": moved}, tol, runs)


def path_checks(out: Path, cpu_only: bool) -> list[Check]:
    """Checks 5-10 in order."""
    return [multi_check(out, cpu_only), quant8_check(out, cpu_only), quant4_check(out, cpu_only),
            resume_check(out, cpu_only), *distributed_checks(out, cpu_only), tasks_check(out, cpu_only),
            activations_check(out, cpu_only)]

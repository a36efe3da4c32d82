"""The runs given to esa-compare, checked, and their results as one tidy table (``runs.csv``).

One row per run × metric × perturbation × k × condition × seed: the main ``--topk`` rows from each
seed's block of ``perturbation_results.json`` (with each task's accuracy when the tasks evaluator
measured them), every other ``--topk-sweep`` k from its ``sweep`` block (perplexity only: that is
what the sweep block records).  Runs are grouped by their evaluation data (the ``data`` fingerprint
of config.json, and what the data is: :func:`assign_groups`): numbers measured on different data
never share a group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from esa.errors import UsageError
from esa.outdir.process import status_of
from esa.outdir.readers import leaf_dirs, read_json

RESULTS = "perturbation_results.json"
COLUMNS = ["run", "group", "model", "parameters", "dtype", "data_source", "eval_windows", "data_fingerprint",
           "metric", "mode", "k", "main_k", "perturbation", "perturb_scale", "condition", "seed", "ppl", "ratio",
           "delta_ppl", "baseline_ppl"]


@dataclass
class Run:
    """One run given on the command line: its folder as given, config.json, status, and each
    (metric, perturbation) folder's perturbation results (a folder without them is left out: only an
    unfinished run, taken with --include-unfinished, can lack some)."""

    path: Path
    config: dict
    status: str
    results: dict[tuple[str, str | None], dict] = field(default_factory=dict)
    group: int = 0

    @property
    def fingerprint(self) -> str:
        return (self.config.get("fingerprints") or {}).get("data") or "unknown"


def _why_not_a_run(path: Path) -> str | None:
    if not path.is_dir():
        return f"{path} is not a folder"
    if not (path / "config.json").is_file():
        return f"{path} is not an ESA run out-dir (no config.json)"
    if not (path / "experiment_manifest.json").is_file():
        inside = next((p for p in path.parents if (p / "experiment_manifest.json").is_file()), None)
        return (f"{path} is a folder inside the run {inside}; give the run's out-dir" if inside
                else f"{path} is not an ESA run out-dir (no experiment_manifest.json)")
    return None


def load_runs(paths: list[Path], include_unfinished: bool = False) -> list[Run]:
    """Every run of ``paths``, checked (UsageError, one line: a run given twice, a folder that is not a
    run, a failed run, an unfinished one unless ``include_unfinished``, a run without perturbation
    results), and numbered into groups of the same evaluation data in the order given."""
    runs: list[Run] = []
    seen: dict[Path, Path] = {}
    for path in map(Path, paths):
        if (why := _why_not_a_run(path)) is not None:
            raise UsageError(why)
        if path.resolve() in seen:
            raise UsageError(f"{path} is given twice (also as {seen[path.resolve()]})")
        seen[path.resolve()] = path
        status = status_of(read_json(path, "experiment_manifest.json"))
        if status == "failed":
            raise UsageError(f"{path}: the run failed (see its experiment_manifest.json); esa-compare reads runs "
                             "that finished")
        if status != "success" and not include_unfinished:
            raise UsageError(f"{path}: the run is unfinished (status {status}); finish it with --resume {path}, or "
                             "pass --include-unfinished to compare what it holds")
        config = read_json(path, "config.json")
        run = Run(path, config, status)
        for key, folder in leaf_dirs(path, config["config"]).items():
            if (res := read_json(folder, RESULTS)) is not None:
                run.results[key] = res
        if not run.results:
            raise UsageError(f"{path} holds no {RESULTS}" + (" yet" if status != "success" else
                                                             " (a run without --perturb: nothing to compare)"))
        runs.append(run)
    assign_groups(runs)
    return runs


def data_description(run: Run) -> tuple:
    """What the evaluation data is, whatever the tokenizer: source, windows, tokens per window, BOS
    policy and the data file's own fingerprint (``--data-file``)."""
    d, fp = run.config["data"], run.config.get("fingerprints") or {}
    return d["data_source"], d["eval_windows"], d["window_tokens"], d.get("bos_policy"), fp.get("data_file")


def assign_groups(runs: list[Run]) -> None:
    """Number the runs into groups of comparable evaluation data, in the order given: the same
    :func:`data_description`, and for two runs of the same model (one tokenizer, so the token windows
    must be the very same) the same ``data`` fingerprint of config.json.  Two models with different
    tokenizers cut the same text into different token windows: their fingerprints differ by
    construction, and they share a group when the description matches."""
    groups: list[list[Run]] = []
    for run in runs:
        fits = (g for g in groups if data_description(g[0]) == data_description(run)
                and all(o.fingerprint == run.fingerprint for o in g if o.config["config"]["model"]
                        == run.config["config"]["model"]))
        group = next(fits, None)
        if group is None:
            groups.append(group := [])
        group.append(run)
        run.group = groups.index(group) + 1


def _acc(row: dict) -> dict[str, float]:
    """Each task's accuracy in a measured row (the tasks evaluator's record), by ``acc:<task>``."""
    tasks = row.get("tasks")
    if not isinstance(tasks, dict):
        return {}
    return {f"acc:{t}": rec["acc"] for t, rec in tasks.items() if isinstance(rec, dict) and "acc" in rec}


def _num(x) -> float:
    return math.nan if x is None else float(x)  # float("inf") reads the "inf" strings of strict JSON


def rows(runs: list[Run]) -> list[dict]:
    """The tidy table (see the module docstring); numbers as floats (inf where a perplexity overflowed)."""
    out = []
    for run in runs:
        c = run.config
        for (metric, _), res in run.results.items():
            base = {"run": str(run.path), "group": run.group, "model": c["config"]["model"],
                    "parameters": c["model"]["num_parameters"], "dtype": c["resolved"]["dtype"],
                    "data_source": c["data"]["data_source"], "eval_windows": res["eval_windows"],
                    "data_fingerprint": run.fingerprint, "metric": metric, "mode": res["mode"], "main_k": res["k"],
                    "perturbation": res["perturb"], "perturb_scale": res["perturb_scale"],
                    "baseline_ppl": _num(res["baseline"]["ppl"])}
            for seed, conds in res["per_seed"].items():
                for cond, row in conds.items():
                    out.append({**base, "k": res["k"], "condition": cond, "seed": int(seed), "ppl": _num(row["ppl"]),
                                "ratio": _num(row["ratio"]), "delta_ppl": _num(row["delta_ppl"]), **_acc(row)})
            sweep = res.get("sweep") or {"k": [], "conditions": {}}
            for i, k in enumerate(sweep["k"]):
                if k == res["k"]:
                    continue  # the main k: its rows above (with the tasks' accuracies)
                for cond, block in sweep["conditions"].items():
                    for seed, v in block["per_seed"].items():
                        out.append({**base, "k": k, "condition": cond, "seed": int(seed), "ppl": _num(v["ppl"][i]),
                                    "ratio": _num(v["ratio"][i]), "delta_ppl": _num(v["delta_ppl"][i])})
    return out


def columns(table: list[dict]) -> list[str]:
    """:data:`COLUMNS`, then each task's accuracy column present in the table (sorted)."""
    return COLUMNS + sorted({k for r in table for k in r if k.startswith("acc:")})

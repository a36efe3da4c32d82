"""A killed run resumes where it stopped and gives the same answer; an out-dir never mixes two runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import esa_runner
from esa.outdir.compare import compare
from esa.outdir.layout import PLOT_FILES, RUN_FILES, describe_run
from tests.realmodels import CORPUS, REPO, tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def args(tiny: str, out, data=CORPUS) -> list[str]:
    return ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(data), "--max-length", "32",
            "--max-samples", "4", "--eval-samples", "4", "--topk", "4", "--mode", "global", "--metric", "grad_x_weight",
            "--seeds", "0,1,2", "--perturb", "gauss_noise", "--controls", "random_k,bottom_k", "--topk-sweep", "2,4",
            "--stability-check", "--out-dir", str(out)]


def killed(argv: list[str], point: str) -> None:
    """Run esa_runner.py in a child process that SIGKILLs itself at ``point``."""
    env = {**os.environ, "ESA_FAULT": point}
    proc = subprocess.run([sys.executable, "esa_runner.py", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert esa_runner.main(args(tiny, out)) == 0
    return out


def journal_lines(out) -> int:
    path = out / "checkpoints" / "evaluations.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.parametrize("point", ["scoring:1", "condition:5", "report"])
def test_a_killed_run_resumes_to_the_same_files(tiny, uninterrupted, tmp_path, point, capsys):
    out = tmp_path / "run"
    killed(args(tiny, out), point)
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["status"] == "running"  # SIGKILL: nothing could record the end
    assert "status killed" in describe_run(out)  # ... but its process is gone: a reader says killed
    before = journal_lines(out)
    assert esa_runner.main(args(tiny, out) + ["--resume", str(out)]) == 0
    assert f"resuming {out}: the run was killed" in capsys.readouterr().err
    diff = {n: v for n, v in compare(out, uninterrupted).items() if v != "identical"}
    assert diff == {}, diff  # top_weights.csv, perturbation_results.json, stability_summary.json, report.md ...
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["status"] == "success" and len(manifest["resumes"]) == 1
    done = manifest["resumes"][0]
    assert done["previous_status"] == "killed" and done["previous_session_s"] > 0
    assert manifest["total_wall_time_s"] == pytest.approx(done["previous_session_s"] + manifest["wall_time_s"])
    # the report names the resume and the total time, not only the resumed part's
    total, first = round(manifest["total_wall_time_s"]), round(done["previous_session_s"])
    assert (f"run: success after {total} s over 2 sessions (started {manifest['started_at']}, killed after {first} s; "
            f"resumed {done['at']}, success after") in (out / "report.md").read_text()
    if point == "scoring:1":  # seed 0 was checkpointed, seed 1 was being scored
        assert done["seeds_done"] == [0] and done["evaluations_done"] == 0
    if point == "condition:5":
        assert done["seeds_done"] == [0, 1, 2] and done["evaluations_done"] == 5
    if point == "report":  # everything was measured: the resume only writes the outputs
        assert done["evaluations_done"] == before and journal_lines(out) == before


def test_only_the_resume_flag_takes_the_recorded_configuration(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    killed(args(tiny, out), "condition:2")
    assert esa_runner.main(["--resume", str(out)]) == 0
    assert json.loads((out / "experiment_manifest.json").read_text())["status"] == "success"
    capsys.readouterr()
    # a finished run: reported, nothing recomputed
    lines = journal_lines(out)
    assert esa_runner.main(["--resume", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out and journal_lines(out) == lines


@pytest.fixture(scope="module")
def refused(tiny, tmp_path_factory):
    """A killed run, shared by the tests whose --resume is refused (a refused resume writes nothing)."""
    out = tmp_path_factory.mktemp("refused") / "run"
    killed(args(tiny, out), "condition:1")
    return out


@pytest.mark.parametrize("change, needle", [
    (("--topk", "5"), "--topk: 4 in the run, 5 now"),
    (("--metric", "act_mag"), "--metric: grad_x_weight in the run, act_mag now"),
    (("--seeds", "0,1"), "--seeds: 0,1,2 in the run, 0,1 now"),
])
def test_resume_refuses_a_changed_command(tiny, refused, capsys, change, needle):
    """The message names each changed flag as the user types it (never a Python repr) and nothing
    else: every other flag of the command is the run's own."""
    out = refused
    argv = args(tiny, out) + ["--resume", str(out)]
    argv[argv.index(change[0]) + 1] = change[1]
    assert esa_runner.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count(" in the run, ") == 1, err


def test_resume_compares_only_the_flags_typed(refused, capsys):
    """``--resume DIR --topk 50``: one difference, --topk; the defaults of flags not typed (--device,
    --seeds, ...) are no difference even though the run typed other values."""
    assert esa_runner.main(["--resume", str(refused), "--topk", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.count(" in the run, ") == 1 and "--topk: 4 in the run, 50 now" in err, err
    assert json.loads((refused / "experiment_manifest.json").read_text())["status"] == "running"  # untouched


def test_resume_refuses_a_changed_model_or_data_file(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    data = tmp_path / "corpus.txt"
    shutil.copy(CORPUS, data)
    out = tmp_path / "run"
    killed(args(str(model), out, data), "condition:1")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0  # one weight
    m.save_pretrained(model)
    assert esa_runner.main(args(str(model), out, data) + ["--resume", str(out)]) == 2
    assert "model weights differ from the run's" in capsys.readouterr().err
    shutil.copytree(tiny, model, dirs_exist_ok=True)  # the model back, the data changed
    data.write_text(data.read_text() + " one more sentence at the end.")
    assert esa_runner.main(args(str(model), out, data) + ["--resume", str(out)]) == 2
    assert "data file differ from the run's" in capsys.readouterr().err


def test_a_used_out_dir_is_refused_and_overwrite_removes_only_the_runs_files(tiny, tmp_path, capsys):
    out = tmp_path / "used"
    planted = [out / n for n in RUN_FILES] + [out / "plots" / n for n in PLOT_FILES] + [
        out / "checkpoints" / "seed_7.npz", out / "checkpoints" / "evaluations.jsonl",
        out / "metrics" / "obs" / "top_weights.csv", out / "metrics" / "obs" / "plots" / "stability.png",
        out / ".report.md.0123abcd.tmp"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}" if p.suffix == ".json" else "earlier run")
    (out / "config.json").write_text(json.dumps({"config": {"model": "old-model", "metric": "obs", "mode": "global",
                                                            "topk": 9}}))
    mine = [out / "notes.txt", out / "plots" / "my_figure.png", out / "metrics" / "README"]
    for p in mine:
        p.write_text("user file")
    assert esa_runner.main(args(tiny, out)) == 2
    assert "holds another run (old-model, obs, global, k=9" in capsys.readouterr().err
    assert esa_runner.main(args(tiny, out) + ["--overwrite"]) == 0
    for p in mine:
        assert p.read_text() == "user file"
    written = {*json.loads((out / "experiment_manifest.json").read_text())["files"], "experiment_manifest.json"}
    for p in planted:  # every earlier file is gone, or rewritten by the new run
        rel = str(p.relative_to(out))
        assert not p.exists() or rel in written or rel.startswith("checkpoints/"), rel
        if p.exists():
            assert p.read_bytes() != b"earlier run", rel
    assert not (out / "checkpoints" / "seed_7.npz").exists() and not (out / "metrics" / "obs").exists()

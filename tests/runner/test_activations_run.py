"""A whole run with ``--evaluate perplexity,activations --restore-activations`` on a model with a planted
massive activation: ``activations.json``, the ``+restored`` conditions beside the plain ones, the plot,
report section and console line; bad activation settings are one-line usage errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import esa_runner
from esa.outdir.compare import compare
from tests.realmodels import CORPUS, embedded_dir
from tests.runner.test_resume import killed
from tests.superweights.test_detect import llama6, plant_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def planted_dir(path: Path) -> tuple[Path, int]:
    """A 6-layer Llama with the real SmolLM2 tokenizer whose layers[2].down_proj[9, 21] writes a
    massive activation into residual channel 9 at every " the" token (the only token carrying its
    source channel 4); returns the folder and that token's id."""
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    the = tok(" the").input_ids[0]
    model = llama6(vocab=len(tok))
    plant_llama(model, layer=2, row=9, col=21, source=4, weight=2000.0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 4] = 0.0
        model.model.embed_tokens.weight[the, 4] = 5.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, the


def run_args(model_dir: Path, out: Path) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--data-file", str(CORPUS), "--metric", "magnitude",
            "--mode", "global", "--topk", "1", "--perturb", "zero", "--controls", "random_k", "--restore-activations",
            "--max-length", "32", "--max-samples", "2", "--eval-samples", "4", "--out-dir", str(out)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return planted_dir(tmp_path_factory.mktemp("planted"))[0]


@pytest.fixture(scope="module")
def full_run(model_dir, tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted run's out-dir and what it printed."""
    out = tmp_path_factory.mktemp("full") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert esa_runner.main(run_args(model_dir, out)) == 0
    return out, printed.getvalue()


def test_restore_activations_run(full_run):
    out, printed = full_run
    pert = json.loads((out / "perturbation_results.json").read_text())
    assert list(pert["conditions"]) == ["top_k", "top_k+restored", "random_k", "random_k+restored"]
    c = pert["conditions"]
    # the planted weight acts only through its massive activation: writing that back restores the model
    assert c["top_k+restored"]["ppl"] == pert["baseline"]["ppl"] != c["top_k"]["ppl"]
    assert c["top_k+restored"]["restored_channels"] == [9] and c["top_k+restored"]["n_changed"] == 1

    act = json.loads((out / "activations.json").read_text())
    base = act["baseline"]
    assert [(g["channel"], g["layers"]) for g in base["massive"]] == [(9, [2, 3, 4, 5])]
    by_name = {x["condition"]: x for x in act["conditions"] if x["experiment"] == "perturbation"}
    assert by_name["top_k"]["still_massive"] == 0 and by_name["top_k"]["gone_from_layer"] == {"9": 2}
    assert by_name["top_k+restored"]["still_massive"] == base["n_massive"]
    assert all(x["ratio"] == 1.0 for x in by_name["top_k+restored"]["change"])
    assert by_name["random_k"]["still_massive"] == base["n_massive"]

    line = f"massive activations: {base['n_massive']} at channels 9 (layers 2–5)"
    assert line in printed
    report = (out / "report.md").read_text()
    assert "## Massive activations" in report and "gone from layer 2 on" in report and "restored" in report
    assert (out / "activations.png").stat().st_size > 1000


def test_a_run_killed_between_perplexity_and_activations_resumes_to_the_same_files(model_dir, full_run, tmp_path):
    """Journal line 3 is the top_k perplexity: the kill leaves its activations record unmeasured, which the
    resume then measures with a forward of its own (the same numbers as riding perplexity's)."""
    out = tmp_path / "run"
    killed(run_args(model_dir, out), "condition:3")
    assert esa_runner.main(run_args(model_dir, out) + ["--resume", str(out)]) == 0
    diff = {n: v for n, v in compare(out, full_run[0]).items() if v != "identical"}
    assert diff == {}, diff


@pytest.mark.parametrize("flags, message", [
    (["--massive-min", "-1"], "--massive-min must be a finite number >= 0"),
    (["--massive-ratio", "0"], "--massive-ratio must be a positive finite number"),
    (["--massive-ratio", "nan"], "--massive-ratio must be a positive finite number"),
    (["--restore-activations"], "--restore-activations needs --perturb"),
    (["--perturb", "zero", "--restore-activations", "--evaluate", "activations"], "--evaluate must start with"),
])
def test_bad_activation_settings_are_one_line_usage_errors(flags, message, tmp_path, capsys):
    argv = ["--device", "cpu", "--data-file", str(CORPUS), "--out-dir", str(tmp_path / "o"), *flags, "--dry-run"]
    assert esa_runner.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_typing_an_activation_setting_adds_the_evaluator(tmp_path, capsys):
    for flags in (["--massive-min", "50"], ["--perturb", "zero", "--restore-activations"]):
        argv = ["--device", "cpu", "--data-file", str(CORPUS), "--out-dir", str(tmp_path / "o"), *flags, "--dry-run"]
        assert esa_runner.main(argv) == 0
        plan = capsys.readouterr().out
        assert "evaluate:      perplexity, activations" in plan and "activations.json, activations.png" in plan

"""A whole run with ``--evaluate perplexity,activations --restore-activations`` on a model with a planted
massive activation: ``activations.json``, the ``+restored`` conditions beside the plain ones, the plot,
report section and console line; bad activation settings are one-line usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import esa_runner
from tests.realmodels import CORPUS, embedded_dir
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


def test_restore_activations_run(tmp_path, capsys):
    model_dir, _ = planted_dir(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--device", "cpu", "--data-file", str(CORPUS), "--metric", "magnitude",
            "--mode", "global", "--topk", "1", "--perturb", "zero", "--controls", "random_k", "--restore-activations",
            "--max-length", "32", "--max-samples", "2", "--eval-samples", "4",
            "--out-dir", str(out)]
    assert esa_runner.main(argv) == 0
    printed = capsys.readouterr().out
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

"""--topk-sweep: parsing and validation, the dose-response curve in perturbation_results.json,
its plot and report section, and that adding a sweep never changes the main results."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import esa_runner
from esa.errors import UsageError
from esa.experiment import controls, selection
from esa.experiment.perturbation import parse_topk_sweep
from esa.experiment.sweep import sweep_curve
from tests.realmodels import CORPUS, tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def args(tiny: str, out, *extra: str) -> list[str]:
    return ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS), "--max-length", "32",
            "--max-samples", "4", "--eval-samples", "4", "--topk", "3", "--out-dir", str(out), *extra]


def test_parse():
    assert parse_topk_sweep("100, 1,10") == (1, 10, 100)
    assert parse_topk_sweep("") == ()
    for bad in ("1,x", "0", "-5", "1,1", "1.5"):
        with pytest.raises(UsageError):
            parse_topk_sweep(bad)


@pytest.mark.parametrize("argv,needle", [
    (["--topk-sweep", "1,x", "--perturb", "zero"], "--topk-sweep must be a comma-separated list"),
    (["--topk-sweep", "0", "--perturb", "zero"], "--topk-sweep values must be positive"),
    (["--topk-sweep", "5,5", "--perturb", "zero"], "duplicates"),
    (["--topk-sweep", "1,10"], "--topk-sweep needs --perturb"),
])
def test_bad_sweep_one_line_exit_2(argv, needle, capsys):
    assert esa_runner.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_sweep_k_too_large_fails_before_scoring(tiny, tmp_path, capsys):
    assert esa_runner.main(args(tiny, tmp_path / "o", "--perturb", "zero", "--topk-sweep", "1,100000")) == 2
    err = capsys.readouterr().err
    assert "--topk-sweep 100000 (per_layer) is too large" in err
    manifest = json.loads((tmp_path / "o" / "experiment_manifest.json").read_text())
    assert "scoring" not in manifest["timings_s"]


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_prefix_of_the_largest_k_is_the_selection_of_a_smaller_k(mode):
    """Sweep selections come from one ranking at the largest k: they must equal direct selection,
    bit for bit and in the same stored order, ties included."""
    gen = torch.Generator().manual_seed(0)
    names = ["a", "b", "c"]
    scores = {n: torch.randint(0, 20, (m,), generator=gen).float() / 7 for n, m in zip(names, (300, 50, 200))}
    big_top = selection.top_k(scores, names, 40, mode)
    big_bottom = controls.control("bottom_k", scores, names, 40, mode, big_top, None)
    for k in (1, 3, 17, 40):
        for big, direct in ((big_top, selection.top_k(scores, names, k, mode)),
                            (big_bottom, controls.control("bottom_k", scores, names, k, mode, big_top, None))):
            got = big.prefix(k, mode, names)
            assert got.size == direct.size
            for n in names:
                assert torch.equal(got.indices[n], direct.indices[n]), (k, n)
                assert torch.equal(got.scores[n], direct.scores[n])
            assert np.array_equal(got.ranked(names), direct.ranked(names))


def test_sweep_curve_with_one_seed_and_inf():
    rows = {1: {"top_k": {"ppl": 2.0, "delta_ppl": 1.0, "ratio": 2.0, "n_perturbed": 1, "n_changed": 1}},
            10: {"top_k": {"ppl": math.inf, "delta_ppl": math.inf, "ratio": math.inf, "n_perturbed": 10,
                           "n_changed": 10}}}
    out = sweep_curve([1, 10], 1, {"0": rows})
    top = out["conditions"]["top_k"]
    assert out["k"] == [1, 10] and top["delta_ppl_mean"] == [1.0, math.inf]
    assert top["delta_ppl_std"] == [None, None]  # one seed: undefined, never 0
    assert top["per_seed"]["0"]["n_perturbed"] == [1, 10]


def test_sweep_end_to_end(tiny, tmp_path, capsys):
    common = ("--perturb", "gauss_noise", "--perturb-scale", "2", "--seeds", "0,1")
    swept, plain = tmp_path / "swept", tmp_path / "plain"
    assert esa_runner.main(args(tiny, swept, *common, "--topk-sweep", "10,1,3", "--save-plots")) == 0
    assert esa_runner.main(args(tiny, plain, *common)) == 0
    res = json.loads((swept / "perturbation_results.json").read_text())
    n_targets = json.loads((swept / "config.json").read_text())["targets"]["count"]
    sw = res["sweep"]
    assert sw["k"] == [1, 3, 10] and sw["main_k"] == 3
    assert set(sw["conditions"]) == {"top_k", "random_k", "bottom_k"}
    for c, block in sw["conditions"].items():
        assert len(block["delta_ppl_mean"]) == 3 and set(block["per_seed"]) == {"0", "1"}
        for seed, s in block["per_seed"].items():
            assert s["n_perturbed"] == [k * n_targets for k in (1, 3, 10)]  # per_layer: k per tensor
            assert s["ppl"][1] == res["per_seed"][seed][c]["ppl"]  # the main k reuses the main evaluation
    # a sweep adds a curve, it never changes the main results (own random streams per k)
    assert res["per_seed"] == json.loads((plain / "perturbation_results.json").read_text())["per_seed"]
    manifest = json.loads((swept / "experiment_manifest.json").read_text())
    assert "plots/dose_response.png" in manifest["files"] and "report.md" in manifest["files"]
    assert "dose_response.png" in (swept / "report.md").read_text()
    assert (plain / "report.md").is_file() and "![" not in (plain / "report.md").read_text()  # no --save-plots
    cfg = json.loads((swept / "config.json").read_text())
    assert cfg["config"]["topk_sweep"] == [1, 3, 10]


def test_help_lists_the_flag_in_the_perturbation_group():
    text = esa_runner.build_parser().format_help()
    group = text.split("perturbation:", 1)[1].split("seeds:", 1)[0]
    assert "--topk-sweep" in group

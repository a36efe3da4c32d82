"""``python -m esa.report OUT_DIR`` rebuilds every figure and report any tool wrote, for every kind of
out-dir the tools make: delete them, regenerate, and the out-dir is the same (compare_outdirs'
rules).  Anything else is one line on stderr and exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
from transformers import AutoTokenizer

import esa_runner
from esa.cli import report
from esa.cli.superweights import main as find_super_weights
from esa.outdir.compare import compare
from tests.realmodels import CORPUS, embedded_dir
from tests.superweights.test_detect import llama6, plant_llama

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def outdirs(tmp_path_factory) -> dict:
    """A quantization + detector run (no --save-plots), a multi-metric run with the detector and
    --save-plots, and a find_super_weights.py out-dir, all on a tiny Llama with a planted super weight."""
    root = tmp_path_factory.mktemp("tools")
    model = root / "planted"
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    net = llama6(vocab=len(tok))
    plant_llama(net, layer=2, row=9, col=21, source=4)
    net.save_pretrained(model)
    tok.save_pretrained(model)
    small = ["--model", str(model), "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
             "--max-length", "32", "--eval-samples", "2", "--batch-size", "2"]
    runner = [*small, "--max-samples", "2", "--mode", "global", "--topk", "5", "--seeds", "0,1",
              "--detect-super-weights"]
    out = {"quantization": root / "quantization", "multi_metric": root / "multi_metric", "super_weights": root / "sw"}
    with contextlib.redirect_stdout(io.StringIO()):
        assert esa_runner.main([*runner, "--metric", "act_mag", "--quantize", "rtn", "--block-size", "channel,tensor",
                                "--out-dir", str(out["quantization"])]) == 0
        assert esa_runner.main([*runner, "--metric", "grad_x_weight,act_mag", "--perturb", "zero", "--save-plots",
                                "--out-dir", str(out["multi_metric"])]) == 0
        assert find_super_weights([*small, "--out-dir", str(out["super_weights"])]) == 0
    return out


@pytest.mark.parametrize("kind", ["quantization", "multi_metric", "super_weights"])
def test_deleted_figures_and_reports_come_back_the_same(outdirs, kind, tmp_path, capsys):
    copy = tmp_path / kind
    shutil.copytree(outdirs[kind], copy)
    made = [p for p in copy.rglob("*") if p.suffix == ".png" or p.name in ("report.md", "super_weights.txt")]
    assert any(p.name == "super_weights.png" for p in made)
    for p in made:
        p.unlink()
    assert report.main([str(copy)]) == 0, capsys.readouterr().err
    printed = set(capsys.readouterr().out.split())
    assert {str(p) for p in made} <= printed  # every file deleted was written again
    diff = {n: v for n, v in compare(outdirs[kind], copy).items() if v != "identical"}
    assert diff == {}, diff  # and nothing else: a run without --save-plots gets no plots/ added


def test_save_plots_draws_the_score_plots_a_run_did_not(outdirs, tmp_path, capsys):
    copy = tmp_path / "q"
    shutil.copytree(outdirs["quantization"], copy)
    assert not (copy / "plots").exists()
    assert report.main([str(copy), "--save-plots"]) == 0
    assert (copy / "plots" / "score_distribution.png").is_file()
    assert "![Score distribution](plots/score_distribution.png)" in (copy / "report.md").read_text()


@pytest.mark.parametrize("content, needle", [
    ({"baseline_results.json": {"tool": "baseline_runner", "results": []}}, "writes no figure or report"),
    ({"notes.json": {}}, "holds no ESA tool's results"),
])
def test_an_out_dir_with_nothing_to_rebuild_is_one_line_exit_2(tmp_path, capsys, content, needle):
    for name, obj in content.items():
        (tmp_path / name).write_text(json.dumps(obj))
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and needle in err, err

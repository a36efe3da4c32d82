"""scripts/compute_overlap.py on synthetic out-dirs: Jaccard, overlap, Spearman, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from scipy import stats

from esa.cli import overlap
from tests.realmodels import REPO

SCRIPT = str(REPO / "scripts" / "compute_overlap.py")


def write_run(path, rows, config: dict | None = None):
    path.mkdir(parents=True)
    lines = ["rank,parameter,index,coords,score,seed"]
    lines += [f"{i + 1},{p},{idx},\"0,{idx}\",{score},{seed}" for i, (p, idx, score, seed) in enumerate(rows)]
    (path / "top_weights.csv").write_text("\n".join(lines) + "\n")
    if config is not None:
        (path / "config.json").write_text(json.dumps({"config": config}))
    return path


def test_overlap_jaccard_and_spearman(tmp_path):
    a = write_run(tmp_path / "a", [("w", 1, 9.0, 0), ("w", 2, 8.0, 0), ("w", 3, 7.0, 0), ("v", 4, 6.0, 0),
                                   ("w", 1, 1.0, 1)])  # a second seed that must be ignored
    b = write_run(tmp_path / "b", [("w", 3, 0.9, 2), ("w", 1, 0.8, 2), ("w", 2, 0.1, 2), ("v", 5, 0.5, 2)])
    out = subprocess.run([sys.executable, SCRIPT, str(a), str(b), "--json", str(tmp_path / "o.json")],
                         capture_output=True, text=True, check=True)
    assert "jaccard" in out.stdout
    pair = json.loads((tmp_path / "o.json").read_text())["pairs"][0]
    assert (pair["size_a"], pair["size_b"], pair["overlap"]) == (4, 4, 3)
    assert pair["jaccard"] == pytest.approx(3 / 5)
    ref = stats.spearmanr([9.0, 8.0, 7.0], [0.8, 0.1, 0.9])  # shared keys in sorted order: w1, w2, w3
    # named for what it computes: the correlation over the shared weights, not the union's (metric_agreement.json)
    assert pair["spearman_on_shared"] == pytest.approx(ref.statistic) and "spearman" not in pair
    assert "spearman_on_shared" in out.stdout and "union" in out.stdout
    assert (pair["seed_a"], pair["seed_b"]) == (0, 2)


@pytest.mark.parametrize("args", [["only_one"], ["missing_a", "missing_b"]])
def test_bad_input_is_one_line_exit_2(tmp_path, args):
    out = subprocess.run([sys.executable, SCRIPT, *[str(tmp_path / a) for a in args]], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error:")


A = [("w", 1, 9.0, 0), ("w", 2, 8.0, 0), ("w", 3, 7.0, 0), ("v", 4, 6.0, 0)]
B = [("w", 3, 0.9, 0), ("w", 1, 0.8, 0), ("w", 2, 0.1, 0), ("v", 5, 0.5, 0)]


def test_a_multi_metric_out_dir_is_one_run_per_metric(tmp_path, capsys):
    """``compute_overlap.py MULTI_DIR``: each metric's folder (metrics/<name>/) is a run, labelled DIR[name]."""
    multi = tmp_path / "multi"
    multi.mkdir()
    (multi / "config.json").write_text(json.dumps({"config": {"metrics": ["grad_x_weight", "act_mag"],
                                                              "mode": "global", "topk": 4}}))
    for name, rows in (("grad_x_weight", A), ("act_mag", B)):
        write_run(multi / "metrics" / name, rows, {"metrics": [name], "mode": "global", "topk": 4})
    single = write_run(tmp_path / "single", A, {"metrics": ["magnitude"], "mode": "global", "topk": 4})
    assert overlap.main([str(multi), str(single), "--json", str(tmp_path / "o.json")]) == 0
    assert capsys.readouterr().err == ""
    pairs = {(p["run_a"], p["run_b"]): p for p in json.loads((tmp_path / "o.json").read_text())["pairs"]}
    assert set(pairs) == {(f"{multi}[grad_x_weight]", f"{multi}[act_mag]"), (f"{multi}[grad_x_weight]", str(single)),
                          (f"{multi}[act_mag]", str(single))}
    assert pairs[(f"{multi}[grad_x_weight]", str(single))]["jaccard"] == 1.0  # the same Top-K
    assert pairs[(f"{multi}[grad_x_weight]", f"{multi}[act_mag]")]["overlap"] == 3
    assert overlap.main([str(multi)]) == 0 and "[act_mag]" in capsys.readouterr().out  # its metrics, pairwise


def test_runs_that_chose_their_top_k_differently_are_compared_with_a_warning(tmp_path, capsys):
    a = write_run(tmp_path / "global_k100", A, {"metrics": ["grad_x_weight"], "mode": "global", "topk": 100})
    b = write_run(tmp_path / "per_layer_k10", B, {"metrics": ["grad_x_weight"], "mode": "per_layer", "topk": 10})
    assert overlap.main([str(a), str(b)]) == 0
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning:") and "global k=100" in warning and "per_layer k=10" in warning

"""scripts/compute_overlap.py on synthetic out-dirs: Jaccard, overlap, Spearman, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from scipy import stats

from tests.realmodels import REPO

SCRIPT = str(REPO / "scripts" / "compute_overlap.py")


def write_run(path, rows):
    path.mkdir()
    lines = ["rank,parameter,index,coords,score,seed"]
    lines += [f"{i + 1},{p},{idx},\"0,{idx}\",{score},{seed}" for i, (p, idx, score, seed) in enumerate(rows)]
    (path / "top_weights.csv").write_text("\n".join(lines) + "\n")
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

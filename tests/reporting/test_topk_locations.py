"""topk_locations.png: counts under global; under per_layer (k in every tensor by construction) the Top-K's
share of each cell's total score, checked on the array the heatmap is drawn from."""

from __future__ import annotations

import csv
import json

import numpy as np

from esa.naming import MODULE_TYPES
from esa.reporting import plots

# two layers, q and down; scores of each tensor (total = sum), its Top-2 per tensor (per_layer)
SCORES = {"model.layers.0.self_attn.q_proj.weight": [9.0, 1.0, 0.5, 0.5],
          "model.layers.0.mlp.down_proj.weight": [4.0, 4.0, 1.0, 1.0],
          "model.layers.1.self_attn.q_proj.weight": [3.0, 2.0, 2.0, 3.0],
          "model.layers.1.mlp.down_proj.weight": [1.0, 0.25, 0.25, 0.5]}


def out_dir(tmp_path, mode: str):
    tensors = {n: {"shape": [2, 2], "count": 4, "mean": float(np.mean(s)), "max": max(s)} for n, s in SCORES.items()}
    (tmp_path / "sensitivity_stats.json").write_text(json.dumps({"metric": "x", "seed": 0, "tensors": tensors}))
    (tmp_path / "config.json").write_text(json.dumps({"config": {"mode": mode}}))
    rows = []
    for name, s in SCORES.items():
        for idx in np.argsort(-np.array(s), kind="stable")[:2]:
            rows.append({"rank": len(rows) + 1, "parameter": name, "index": int(idx), "score": f"{s[idx]:.9g}",
                         "seed": 0})
    with open(tmp_path / "top_weights.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return tmp_path


def drawn(monkeypatch, folder) -> tuple[np.ndarray, str]:
    """The array and title the heatmap is drawn with."""
    seen = {}
    real = plots.layer_type_heatmap

    def capture(shown, ylabels, cmap, cells, **kw):
        seen["shown"], seen["title"], seen["labels"] = np.ma.filled(shown, 0.0), kw["title"], ylabels
        return real(shown, ylabels, cmap, cells, **kw)
    monkeypatch.setattr(plots, "layer_type_heatmap", capture)
    assert plots.plot_topk_locations(folder, folder / "plots" / "topk_locations.png")
    assert seen["labels"] == ["emb/head", "0", "1"]
    return seen["shown"], seen["title"]


def test_per_layer_shows_each_cells_share_of_its_total_score(tmp_path, monkeypatch):
    shown, title = drawn(monkeypatch, out_dir(tmp_path, "per_layer"))
    q, down = MODULE_TYPES.index("q"), MODULE_TYPES.index("down")
    expected = np.zeros_like(shown)
    expected[1, q], expected[1, down] = 10 / 11, 8 / 10  # the two largest scores / the tensor's total
    expected[2, q], expected[2, down] = 6 / 10, 1.5 / 2
    np.testing.assert_allclose(shown, expected, rtol=1e-9)
    assert "share" in title
    assert "highest in q of layer 0 (90.9 %)" in plots.read_topk_locations(tmp_path)


def test_global_keeps_counts(tmp_path, monkeypatch):
    shown, title = drawn(monkeypatch, out_dir(tmp_path, "global"))
    assert shown.sum() == 8 and set(np.unique(shown)) == {0.0, 2.0}
    assert "count" in title


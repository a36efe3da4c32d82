"""The experiments' own figures answer their question at a glance: quantization.png (does protecting
weights help, per block size) and super_weights.png (which spikes are candidates, and why not the
others), checked on the drawn matplotlib figure."""

from __future__ import annotations

import math

import pytest
from matplotlib.text import Annotation, Text

from esa.outdir.atomic import write_json
from esa.reporting import quantization, superweights


@pytest.fixture
def drawn(monkeypatch):
    """The figures a plotting function saves, kept open (rendered) for inspection instead of written."""
    figures = []

    def keep(fig, dest, dpi=120):
        fig.canvas.draw()
        figures.append(fig)
        return dest

    monkeypatch.setattr(quantization, "save", keep)
    monkeypatch.setattr(superweights, "save", keep)
    return figures


def _row(ppl: float, base: float) -> dict:
    return {"ppl": ppl, "ratio": ppl / base, "delta_ppl": ppl - base, "protected": 5}


def quantization_results(base: float = 20.0) -> dict:
    """Two block sizes, one where plain RTN costs ×1.01 and one where it costs ×100; protecting the
    Top-K helps by 10 % in both, random weights by 1 %, the super weights not at all."""
    per_seed = {}
    for seed, jitter in (("0", 1.0), ("1", 1.002)):
        blocks = {}
        for b, none in (("channel", 1.01 * base), ("tensor", 100.0 * base)):
            blocks[b] = {"none": _row(none, base), "protect_topk": _row(0.9 * none * jitter, base),
                         "protect_random_k": _row(0.99 * none * jitter, base),
                         "protect_super_weights": _row(none, base)}
        per_seed[seed] = blocks
    return {"quantizer": {"bits": 4}, "metric": "act_mag", "k": 5, "block_sizes": ["channel", "tensor"],
            "baseline": {"ppl": base}, "seeds": [0, 1], "per_seed": per_seed}


def test_quantization_figure_shows_each_block_sizes_ratio_to_plain_rtn(tmp_path, drawn):
    """One panel per block size, each protection plotted as its perplexity change against plain RTN
    (``none``) of the same seed: a 10 % rescue fills its panel whether RTN costs ×1.01 or ×100."""
    res = quantization_results()
    write_json(tmp_path / quantization.RESULTS, res)
    quantization.plot(tmp_path)
    (fig,) = drawn
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == len(res["block_sizes"])
    for ax, b in zip(panels, res["block_sizes"]):
        shown = sorted(round(float(y), 6) for c in ax.collections for _, y in c.get_offsets())
        none = {s: rows[b]["none"]["ppl"] for s, rows in res["per_seed"].items()}
        want = [100 * (rows[b][c]["ppl"] / none[s] - 1) for s, rows in res["per_seed"].items()
                for c in ("protect_topk", "protect_random_k", "protect_super_weights")]
        means = [100 * (sum(rows[b][c]["ppl"] / none[s] for s, rows in res["per_seed"].items()) / 2 - 1)
                 for c in ("protect_topk", "protect_random_k", "protect_super_weights")]
        assert shown == sorted(round(v, 6) for v in want + means), b  # every seed and each mean, in %
        lo, hi = ax.get_ylim()
        assert hi - lo < 30, (b, lo, hi)  # the -10 % of protect_topk spans a third of the panel or more
    fig_box = fig.bbox
    for ax in fig.axes:  # no label is cut: every text lies inside the figure
        for text in [ax.yaxis.label, ax.title]:
            box = text.get_window_extent()
            assert box.y0 >= fig_box.y0 - 1 and box.y1 <= fig_box.y1 + 1 and box.x0 >= fig_box.x0 - 1, text


def test_quantization_figure_survives_an_infinite_perplexity(tmp_path, drawn):
    res = quantization_results()
    res["per_seed"]["1"]["tensor"]["protect_random_k"] = _row(math.inf, 20.0)
    write_json(tmp_path / quantization.RESULTS, res)
    assert quantization.plot(tmp_path) is not None and len(drawn) == 1


def _layer(i: int, out_max: float, spike: bool) -> dict:
    return {"module": f"model.layers.{i}.mlp.down_proj", "layer": i, "in_max": out_max / 10, "in_channel": 3,
            "out_max": out_max, "out_channel": 507 if spike else 11, "out_ratio": out_max / 20.0, "called": True,
            "spike": spike}


def _candidate(layer: int, col: int, out: float) -> dict:
    return {"layer": layer, "module": f"model.layers.{layer}.mlp.down_proj",
            "param": f"model.layers.{layer}.mlp.down_proj.weight", "row": 507, "col": col, "weight": 5.0,
            "output_activation": out, "output_ratio": out / 20.0, "expert": None}


def spike_search() -> dict:
    """30 layers; pass 0 spikes at L28 (9e3) and L29 (7e3, a consequence of L28: gone once #1 is
    zeroed); two candidates in L28 (columns 678 and 91), found in passes 0 and 1."""
    def layers(spikes: dict[int, float]) -> list[dict]:
        return [_layer(i, spikes.get(i, 20.0 + i), i in spikes) for i in range(30)]
    zeroed = [["model.layers.28.mlp.down_proj.weight", 1], ["model.layers.28.mlp.down_proj.weight", 2]]
    passes = [{"zeroed": [], "median_out_max": 20.0, "layers": layers({28: 9e3, 29: 7e3})},
              {"zeroed": zeroed[:1], "median_out_max": 20.0, "layers": layers({28: 4e3})},
              {"zeroed": zeroed, "median_out_max": 20.0, "layers": layers({})}]
    return {"settings": {"threshold": 50.0}, "passes": passes, "stopped": "no new spike",
            "candidates": [_candidate(28, 678, 9e3), _candidate(28, 91, 4e3)]}


def test_super_weight_figure_marks_each_candidate_and_says_why_a_spike_is_not_one(tmp_path, drawn):
    res = spike_search()
    superweights.plot_spikes(res, tmp_path / "super_weights.png")
    (fig,) = drawn
    ax = fig.axes[0]
    stars = [c for c in ax.collections if len(c.get_offsets()) == len(res["candidates"])
             and "candidate" in (c.get_label() or "")]
    assert len(stars) == 1 and len({tuple(p) for p in stars[0].get_offsets()}) == 2  # one marker each, apart
    labels = [t for t in ax.texts if isinstance(t, Annotation)]
    assert sorted(t.get_text() for t in labels) == ["#1", "#2", "L29"]  # candidates by number; the other spike
    boxes = [Text.get_window_extent(t) for t in labels]  # the text itself, not its line to the point
    for i, a in enumerate(boxes):  # L28's two candidates and L29's spike sit close: no label covers another
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    notes = "\n".join(t.get_text() for t in ax.texts)
    assert "L29 ch 507: spike, not a candidate: gone once #1 was zeroed" in notes
    assert "#2: L28 [507, 91]" in notes

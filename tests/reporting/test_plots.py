"""Every plot is drawn from a synthetic out-dir (no model), is non-trivial, and survives edge cases."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch

from esa.analysis.score_sample import load_ccdf
from esa.naming import module_type
from esa.reporting import plots
from esa.reporting.plots import PLOTS, make_plots
from esa.runner.score_sample import sample_scores
from tests.synthetic_outdir import make_out_dir

ALL = {s.file for s in PLOTS}


def assert_non_trivial(path, min_bytes: int = 15_000) -> np.ndarray:
    pixels = matplotlib.image.imread(path)
    assert path.stat().st_size > min_bytes, (path.name, path.stat().st_size)
    assert pixels.std() > 0.05, (path.name, pixels.std())  # not a blank canvas
    return pixels


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return make_out_dir(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def made(out_dir):
    return make_plots(out_dir)


def test_every_plot_is_drawn_and_non_trivial(out_dir, made):
    assert {p.name for p in made} == ALL
    for p in made:
        assert p.parent == out_dir / "plots"
        assert_non_trivial(p)
    assert not list((out_dir / "plots").glob(".*"))  # no temporary files left behind


def test_35_layers_stay_readable(out_dir, made):
    """The layer heatmap grows with the number of layers instead of squeezing 36 rows together."""
    pixels = assert_non_trivial(out_dir / "plots" / "topk_locations.png")
    assert pixels.shape[0] >= 36 * 25  # at least ~25 px per row at 120 dpi
    conc = assert_non_trivial(out_dir / "plots" / "score_concentration.png")
    assert conc.shape[0] >= 36 * 25  # the same layer x module-type grid


def test_every_reading_is_a_sentence_from_the_data(out_dir):
    readings = {s.file: s.read(out_dir) for s in PLOTS}
    assert all(r and r.endswith(".") for r in readings.values()), readings
    # the synthetic super weights sit in the down projections of layers 2 and 3
    assert "down" in readings["topk_locations.png"]
    assert "×" in readings["perturbation_effect.png"] and "random_k" in readings["perturbation_effect.png"]
    assert "k=1 " in readings["dose_response.png"]
    assert "Jaccard" in readings["stability.png"]
    assert "heavy-tailed" in readings["score_distribution.png"]


def test_optional_plots_are_skipped_without_their_data(tmp_path):
    out = make_out_dir(tmp_path / "one", layers=3, seeds=(4,), sweep=())
    assert {p.name for p in make_plots(out)} == ALL - {"stability.png", "dose_response.png"}
    out = make_out_dir(tmp_path / "noperturb", layers=3, seeds=(0, 1), sweep=(), perturb=False)
    assert {p.name for p in make_plots(out)} == ALL - {"perturbation_effect.png", "dose_response.png"}


def test_stability_from_top_weights_without_stability_check(tmp_path):
    out = make_out_dir(tmp_path / "o", layers=3, seeds=(0, 1))
    (out / "stability_summary.json").unlink()
    assert "stability.png" in {p.name for p in make_plots(out)}
    assert "Jaccard" in plots.PLOTS[4].read(out)


def test_infinite_perplexity_is_drawn_not_a_crash(tmp_path):
    out = make_out_dir(tmp_path / "inf", layers=3, inf_top=True)
    made = make_plots(out)
    assert {p.name for p in made} == ALL
    assert_non_trivial(out / "plots" / "perturbation_effect.png")
    assert "×inf" in PLOTS[3].read(out)


def test_ccdf_from_the_sample_matches_the_exact_ccdf():
    """Exact above the kept tail, unbiased (within sampling error) below it, zeros excluded."""
    gen = torch.Generator().manual_seed(0)
    scores = {f"model.layers.{i}.mlp.down_proj.weight": torch.exp(2 * torch.randn(50_000, generator=gen))
              for i in range(4)}
    scores["model.layers.0.mlp.down_proj.weight"][:100] = 0.0
    names = list(scores)
    npz = sample_scores(scores, names, np.random.default_rng(1), tail=500, bulk=4096)
    x, p, n = load_ccdf(npz)
    allv = torch.cat([s for s in scores.values()]).double().numpy()
    assert n == allv.size and x[0] == pytest.approx(allv.max()) and (x > 0).all()
    exact = np.sort(allv)[::-1]
    assert np.allclose(x[:500], exact[:500])  # the top 500 are exact and in order
    assert np.allclose(p[:500], np.arange(1, 501) / n)
    for q in (0.5, 0.1, 0.01):  # bulk quantiles within a few percent
        thr = np.quantile(allv, 1 - q)
        est = p[np.searchsorted(-x, -thr, side="right") - 1]
        assert est == pytest.approx(q, rel=0.1), q
    assert npz["nonpositive"].sum() == 100


@pytest.mark.parametrize("name,kind", [
    ("model.layers.3.self_attn.q_proj.weight", "q"), ("transformer.h.0.attn.c_proj.weight", "o"),
    ("transformer.h.0.mlp.c_fc.weight", "up"), ("transformer.h.0.mlp.c_proj.weight", "down"),
    ("gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "down"), ("model.embed_tokens.weight", "embeddings"),
    ("lm_head.weight", "lm_head"), ("transformer.h.0.attn.c_attn.weight", "other"),
    ("model.layers.0.block_sparse_moe.experts.1.w2.weight", "down"),
])
def test_module_type_is_generic(name, kind):
    assert module_type(name) == kind
    assert plots.module_type(name) == kind  # still importable from esa.reporting.plots


def test_sci_formatting():
    from esa.reporting.format import count_text, ratio_text, sci
    assert sci(1234.5) == "1234" and sci(3.2e4) == "3.2e4" and sci(5.1e-7) == "5.1e-7" and sci("inf") == "inf"
    assert ratio_text(1.0002) == "×1.0002" and ratio_text(32000) == "×3.2e4" and ratio_text(math.inf) == "×inf"
    assert count_text(1024) == "1,024" and count_text(134_515_008) == "134.5M"

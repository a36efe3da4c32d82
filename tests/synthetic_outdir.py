"""A small synthetic ESA out-dir written by hand: what plots and report.md are built from.

35 layers with long parameter names (readability), 3 seeds, a --topk-sweep, heavy-tailed scores
whose ``score_distribution.npz`` is made by the real sampler.  No model is involved.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from esa.analysis import significance
from esa.analysis.stability import stability_summary
from esa.analysis.stats import tensor_stats
from esa.experiment.selection import top_k
from esa.experiment.sweep import sweep_curve
from esa.outdir.atomic import write_json
from esa.runner.score_sample import write_score_sample

PREFIX = "model.language_model.decoder_stack.transformer_layers"
LEAVES = ("self_attention.q_proj", "self_attention.k_proj", "self_attention.v_proj", "self_attention.o_proj",
          "feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")
K = 100
BASE_PPL = 20.0


def names(layers: int) -> list[str]:
    return (["model.language_model.embed_tokens.weight"]
            + [f"{PREFIX}.{i}.{leaf}.weight" for i in range(layers) for leaf in LEAVES]
            + ["model.language_model.final_projection_adapter.weight"])  # an "other" tensor


def fake_scores(layers: int, seed: int, numel: int = 4096) -> dict[str, torch.Tensor]:
    """Heavy-tailed (log-normal) scores, a few huge ones in the down projections of layers 2 and 3."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in names(layers):
        s = torch.exp(2.5 * torch.randn(numel, generator=gen)) * 1e-6
        if ".2.feed_forward.down" in n or ".3.feed_forward.down" in n:
            s[:40] *= 1e5  # the "super weights": the same positions for every seed
        out[n] = s
    out[names(layers)[0]][:5] = 0.0  # exact zeros, which a log axis cannot show
    return out


def _row(ppl: float, k: int) -> dict:
    return {"ppl": ppl, "mean_nll": math.log(ppl), "delta_ppl": ppl - BASE_PPL, "ratio": ppl / BASE_PPL,
            "n_selected": k, "n_perturbed": k, "n_changed": k}


def conditions(seed: int, k: int, inf_top: bool = False) -> dict:
    """Top-K effect grows with k; the controls barely move perplexity (one even lowers it)."""
    top = math.inf if inf_top else BASE_PPL * (1 + 3e3 * (k / K) ** 1.5 * (1 + 0.3 * seed))
    return {"top_k": _row(top, k), "random_k": _row(BASE_PPL * (1 + 1e-4 * k / K * (1 + seed)), k),
            "bottom_k": _row(BASE_PPL * (1 - 2e-6 * (seed + 1)), k)}


def make_out_dir(out: Path, layers: int = 35, seeds: tuple[int, ...] = (0, 1, 2), sweep: tuple[int, ...] = (1, 10, 100),
                 perturb: bool = True, inf_top: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    all_names = names(layers)
    tops, rows = [], []
    for i, seed in enumerate(seeds):
        scores = fake_scores(layers, seed)
        top = top_k(scores, all_names, K, "global", need=2)
        tops.append(top)
        for rank, (n, idx, sc) in enumerate(top.ranked(all_names), start=1):
            rows.append([rank, n, idx, str(idx), f"{sc:.9g}", seed])
        if i == 0:
            write_score_sample(out / "score_distribution.npz", scores, all_names, top, np.random.default_rng(0),
                               {"metric": "grad_x_weight", "mode": "global", "k": K, "seed": seed})
            write_json(out / "sensitivity_stats.json", {"metric": "grad_x_weight", "seed": seed, "tensors": {
                n: {"shape": [4096], **tensor_stats(s)} for n, s in scores.items()}})
    with open(out / "top_weights.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([["rank", "parameter", "index", "coords", "score", "seed"], *rows])
    files = ["config.json", "sensitivity_stats.json", "score_distribution.npz", "top_weights.csv"]
    if len(seeds) >= 2:
        write_json(out / "stability_summary.json", stability_summary(tops, list(seeds), K, "grad_x_weight", "global"))
        files.append("stability_summary.json")
    if perturb:
        per_seed = {str(s): conditions(s, K, inf_top) for s in seeds}
        res = {"seed": seeds[0], "metric": "grad_x_weight", "mode": "global", "k": K, "perturb": "zero",
               "perturb_scale": 1.0, "perturb_prob": 1.0, "bit_index": None, "eval_windows": 8,
               "baseline": {"ppl": BASE_PPL, "mean_nll": math.log(BASE_PPL), "tokens": 1016},
               "conditions": per_seed[str(seeds[0])], "seeds": list(seeds), "per_seed": per_seed}
        if len(seeds) >= 2:
            res["summary"] = significance.condition_summary(per_seed)
            res["tests"] = significance.top_vs_controls(per_seed)
        if sweep:
            res["sweep"] = sweep_curve(list(sweep), K, {str(s): {k: conditions(s, k, inf_top) for k in sweep}
                                                        for s in seeds})
        write_json(out / "perturbation_results.json", res)
        files.append("perturbation_results.json")
    write_json(out / "config.json", {
        "config": {"model": "synthetic/very-long-model-name-for-readability-checks", "metric": "grad_x_weight",
                   "mode": "global", "topk": K, "topk_sweep": list(sweep), "controls": ["random_k", "bottom_k"],
                   "perturb": "zero" if perturb else None, "perturb_scale": 1.0, "perturb_prob": 1.0,
                   "seeds": list(seeds), "max_samples": 8},
        "resolved": {"device": "cpu", "dtype": "fp32", "seeds_run": list(seeds)},
        "targets": {"count": len(all_names), "weights": 4096 * len(all_names), "tied": {}},
        "data": {"data_source": "file:/synthetic.txt", "eval_windows": 8, "window_tokens": 128},
    })
    write_json(out / "experiment_manifest.json", {"status": "success", "error": None, "wall_time_s": 12.5,
                                                   "files": files})
    return out

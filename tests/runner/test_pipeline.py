"""End to end: the model is restored bit-exactly after every condition; the real model on real text."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import esa_runner
from esa.config import RunConfig
from esa.model.device import resolve_device
from esa.outdir.manifest import Manifest
from esa.runner.experiments import measure_experiments
from esa.runner.pipeline import load
from esa.runner.seeds import score_seed
from tests.realmodels import CORPUS, tiny_model_dir


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("perturb", ["zero", "sign_flip", "gauss_noise"])
def test_every_condition_restores_the_model_bit_exactly(tmp_path_factory, tmp_path, dtype, perturb):
    d = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    cfg = RunConfig.of(model=str(d), device="cpu", dtype=dtype, perturb=perturb, perturb_scale=0.7, topk=4,
                       max_length=32, max_samples=4, eval_samples=4, data_file=str(CORPUS), out_dir=str(tmp_path))
    ctx = load(cfg, resolve_device("cpu", True, dtype, True), "cpu", tmp_path, Manifest(tmp_path))
    before = state_hash(ctx.model)
    result = score_seed(ctx, 0, write_stats=False).results[cfg.metric]
    assert state_hash(ctx.model) == before  # scoring never changes weights
    res = measure_experiments(ctx, [result])["perturbation"]
    assert state_hash(ctx.model) == before
    assert all(c["n_perturbed"] == 4 * len(ctx.targets) for c in res["conditions"].values())
    assert res["conditions"]["top_k"]["ppl"] != res["baseline"]["ppl"]  # the perturbation did something


def test_real_model_top_k_hurts_more_than_controls(tmp_path, capsys, wikitext2):
    """The embedded SmolLM2-135M on WikiText-2: sign-flipping the Top-K must beat both controls."""
    out = tmp_path / "real"
    argv = ["--device", "cpu", "--data-file", str(wikitext2), "--metric", "grad_x_weight", "--mode", "per_layer",
            "--topk", "10", "--perturb", "sign_flip", "--controls", "random_k,bottom_k", "--max-length", "128",
            "--max-samples", "8", "--eval-samples", "8", "--out-dir", str(out)]
    assert esa_runner.main(argv) == 0
    print(capsys.readouterr().out)  # the summary table, shown with pytest -s
    res = json.loads((out / "perturbation_results.json").read_text())
    base = res["baseline"]["ppl"]
    assert 5.0 < base < 200.0  # a real 135M model on real text, not an artefact like 1.03
    c = res["conditions"]
    assert c["top_k"]["delta_ppl"] > c["random_k"]["delta_ppl"]
    assert c["top_k"]["delta_ppl"] > c["bottom_k"]["delta_ppl"]
    assert c["top_k"]["ratio"] > 2.0

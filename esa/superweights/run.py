"""``scripts/find_super_weights.py``'s job: load, detect, ablate, write the files, print the table
(the flags: :mod:`esa.cli.superweights`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from esa.data import load_data
from esa.evaluators import EvalInputs
from esa.evaluators.measure import Measurer
from esa.model.introspect import model_record
from esa.model.session import start_tool
from esa.options import flat_json
from esa.outdir.atomic import write_json
from esa.outdir.provenance import git_sha, versions
from esa.reporting import parts
from esa.reporting.superweights import format_table, write_super_weights
from esa.superweights.ablation import ablation_measured, detection_input, run_super_weights
from esa.superweights.config import DETECT_WINDOWS, SuperWeightConfig

log = logging.getLogger("esa")


def run(cfg: SuperWeightConfig, out_dir: str | Path) -> int:
    """Load the model and data, detect, ablate, write the files and print the table; the exit code."""
    out_dir, choice, manifest, model, tok = start_tool(Path(out_dir), cfg.model, cfg.device, cfg.device_explicit,
                                                       cfg.dtype, cfg.dtype_explicit)
    with manifest.recording():
        with manifest.phase("load_data"):
            data = load_data(tok, cfg.data_file, None, cfg.max_length, cfg.eval_samples,
                             DETECT_WINDOWS if cfg.detect_on_data else 0)
        input_ids = detection_input(tok, cfg.prompt, data.calib_pool, cfg.detect_on_data)
        settings = {"model": cfg.model, "model_description": model_record(model),
                    "detect_on": "data" if cfg.detect_on_data else "prompt",
                    "prompt": None if cfg.detect_on_data else cfg.prompt, "data_source": data.data_source,
                    "bos_policy": data.bos_policy, "eval_samples": cfg.eval_samples, "max_length": cfg.max_length,
                    "device": choice.device, "dtype": choice.dtype, "config": flat_json(cfg),
                    "command": sys.argv, "versions": versions(), "git_sha": git_sha()}
        with manifest.phase("detect_and_ablate"):
            log.info("detecting on %d sequence(s) of %d tokens; ablation on %d windows", input_ids.shape[0],
                     input_ids.shape[1], len(data.eval_windows))
            measurer = Measurer(model, cfg.evaluation.build(EvalInputs(data.eval_windows, cfg.batch_size, tok, model)))
            results = run_super_weights(model, input_ids, measurer, threshold=cfg.threshold,
                                        max_super_weights=cfg.max_super_weights, seed=cfg.seed, tokenizer=tok,
                                        settings=settings)
        for name in write_super_weights(results, out_dir):
            manifest.add_file(name)
        measured = [m for m in (ablation_measured(results),) if m is not None]
        evaluations = measurer.results_files(measured)  # e.g. task_results.json
        for name, content in evaluations.items():
            write_json(out_dir / name, content)
            manifest.add_file(name)
        for figure in parts.figures(out_dir, only=evaluations):
            manifest.add_file(figure.name)
        print(format_table(results), flush=True)
        for line in parts.console(out_dir, only=evaluations):
            print(line, flush=True)
        print(f"files: {out_dir}", flush=True)
        manifest.finish("success")
    return 0

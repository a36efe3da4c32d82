"""Find super weights (Yu et al. 2024) in a model's MLP down projections and validate them by ablation.

One forward pass of a prompt (or of calibration text, --detect-on-data) records the max |input|
and |output| of every MLP output projection; a layer whose max |output| is >= --threshold x the
median over layers is a spike, and its largest |w * x| contributor is a candidate super weight.
Candidates are zeroed and the pass repeated until no new spike (or --max-super-weights).  Each
candidate is then zeroed alone, all together, and against as many random weights of the same
matrices, and perplexity is measured on the evaluation windows.  Method: :mod:`esa.superweights.detect`;
ablation: :mod:`esa.superweights.ablation`; files: :mod:`esa.reporting.superweights`.

    python scripts/find_super_weights.py --model smollm2-135m --device cpu --data-file wiki.test.raw

Writes OUT_DIR/super_weights.json (everything, including per-layer maxima), super_weights.txt
(the table, also printed), super_weights.png (the spike plot) and experiment_manifest.json.
Exit codes: 0 success (also when no candidate is found), 2 bad input (one line on stderr),
1 crash, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esa.cli import flags
from esa.cli.common import Parser, explicit, plan_device, tool_main
from esa.data import check_text_file
from esa.errors import UsageError
from esa.evaluators import evaluator_options
from esa.evaluators.spec import EvaluationSpec, validate_evaluation
from esa.options import check_spec, spec_options
from esa.outdir.layout import default_out_dir, model_slug
from esa.superweights.config import DETECT_WINDOWS, SuperWeightConfig


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="find_super_weights.py", description=__doc__.split("\n\n")[0])
    flags.add_options(p, spec_options(SuperWeightConfig))
    flags.add_options(p.add_argument_group("evaluation (every ablation condition is measured by each evaluator)"),
                      spec_options(EvaluationSpec) + evaluator_options())
    return p


def config_from_args(argv: list[str]) -> SuperWeightConfig:
    """Validate every flag that can be checked without the model."""
    parser = build_parser()
    vals = flags.values(parser.parse_args(argv))
    given = flags.typed(parser, argv)
    if "prompt" in given and vals["detect_on_data"]:
        raise UsageError("give either --prompt or --detect-on-data, not both")
    if not vals["prompt"].strip():
        raise UsageError("--prompt is empty")
    evaluation = flags.evaluation(vals, given)
    cfg = flags.spec(SuperWeightConfig, vals, evaluation=evaluation, **explicit(given))
    check_spec(cfg)
    validate_evaluation(evaluation)
    if cfg.data_file is not None:
        check_text_file(cfg.data_file, "--data-file")
    return cfg


def default_super_weights_dir(cfg: SuperWeightConfig) -> Path:
    """``outputs/super_weights_<model>_<timestamp>``."""
    return default_out_dir("super_weights", model_slug(cfg.model))


def plan(cfg: SuperWeightConfig) -> tuple[str, list[tuple[str, str]], tuple[str, ...]]:
    """The run's plan without loading anything (--dry-run)."""
    choice = plan_device(cfg.device, cfg.device_explicit, cfg.dtype, cfg.dtype_explicit)
    detect = (f"the first {DETECT_WINDOWS} calibration windows of the data" if cfg.detect_on_data
              else f"the prompt {cfg.prompt!r}")
    rows = [("model", cfg.model), ("device", f"{choice.device}, dtype {choice.dtype}"), ("detect on", detect),
            ("rule", f"spike = max |down-proj output| >= {cfg.threshold:g}x the median over layers; "
                     f"at most {cfg.max_super_weights} candidates"),
            ("data", cfg.data_file or "WikiText-2 test split if loadable, else the bundled sample corpus"),
            ("ablation", f"{cfg.eval_samples} windows x {cfg.max_length} tokens, batch {cfg.batch_size}, "
                         f"random control seed {cfg.seed}; measured by {cfg.evaluation.describe()}"),
            ("out dir", str(cfg.out_dir or default_super_weights_dir(cfg)))]
    return "super-weight plan (dry run: no model is loaded, nothing is written)", rows, choice.warnings


def main(argv: list[str] | None = None) -> int:
    return tool_main(argv, config_from_args, plan, "esa.superweights.run:run", default_super_weights_dir)


if __name__ == "__main__":
    sys.exit(main())

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
import math
import sys
from pathlib import Path

from esa.cli.common import (
    Parser,
    add_model_args,
    add_output_args,
    model_spec_args,
    plan_device,
    tool_main,
)
from esa.data import check_text_file
from esa.errors import UsageError
from esa.outdir.layout import default_out_dir, model_slug
from esa.superweights.config import (
    DEFAULT_MAX_SUPER_WEIGHTS,
    DEFAULT_PROMPT,
    DEFAULT_THRESHOLD,
    DETECT_WINDOWS,
    SuperWeightConfig,
)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="find_super_weights.py", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--data-file", default=None, help="text file for the evaluation windows (and --detect-on-data); "
                   "default: WikiText-2 test split if loadable, else the bundled sample corpus")
    p.add_argument("--prompt", default=None, help=f"detection prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--detect-on-data", action="store_true", help=f"detect on the first {DETECT_WINDOWS} "
                   "calibration windows of the data instead of the prompt")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="spike = max |down-proj output| >= "
                   f"this x the median over layers (> 1; default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--max-super-weights", type=int, default=DEFAULT_MAX_SUPER_WEIGHTS,
                   help=f"stop the iterative search after this many candidates (default {DEFAULT_MAX_SUPER_WEIGHTS})")
    p.add_argument("--eval-samples", type=int, default=16, help="evaluation windows for the ablation (default 16)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weight control (default 0)")
    add_output_args(p, "output directory (default: outputs/super_weights_<model>_<time>)")
    return p


def config_from_args(ns: argparse.Namespace) -> SuperWeightConfig:
    """Validate every flag that can be checked without the model."""
    if not (math.isfinite(ns.threshold) and ns.threshold > 1.0):
        raise UsageError(f"--threshold must be a finite number > 1 (a multiple of the median), got {ns.threshold}")
    for flag, value, minimum in (("--max-super-weights", ns.max_super_weights, 1), ("--eval-samples",
                                 ns.eval_samples, 1), ("--batch-size", ns.batch_size, 1),
                                 ("--max-length", ns.max_length, 2), ("--seed", ns.seed, 0)):
        if value < minimum:
            raise UsageError(f"{flag} must be at least {minimum}, got {value}")
    if ns.prompt is not None and ns.detect_on_data:
        raise UsageError("give either --prompt or --detect-on-data, not both")
    if ns.prompt is not None and not ns.prompt.strip():
        raise UsageError("--prompt is empty")
    if ns.data_file is not None:
        check_text_file(ns.data_file, "--data-file")
    return SuperWeightConfig(
        **model_spec_args(ns), data_file=ns.data_file, prompt=ns.prompt or DEFAULT_PROMPT,
        detect_on_data=ns.detect_on_data, threshold=ns.threshold, max_super_weights=ns.max_super_weights,
        eval_samples=ns.eval_samples, max_length=ns.max_length, batch_size=ns.batch_size, seed=ns.seed,
        out_dir=ns.out_dir, dry_run=ns.dry_run, verbose=ns.verbose)


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
                         f"random control seed {cfg.seed}"),
            ("out dir", str(cfg.out_dir or default_super_weights_dir(cfg)))]
    return "super-weight plan (dry run: no model is loaded, nothing is written)", rows, choice.warnings


def main(argv: list[str] | None = None) -> int:
    return tool_main(argv, lambda a: config_from_args(build_parser().parse_args(a)), plan, "esa.superweights.run:run",
                     default_super_weights_dir)


if __name__ == "__main__":
    sys.exit(main())

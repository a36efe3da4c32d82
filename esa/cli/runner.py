"""``esa_runner.py``: the ESA command line.

The parser is built from the declarations of the config groups and of the registries (metric,
experiment and evaluator options: :mod:`esa.options`), so each flag's default is the config's;
the parsed flags are frozen into an :class:`esa.config.RunConfig`, validated, and handed to
:func:`esa.runner.pipeline.run`.  ``main(argv)`` returns the exit code: 0 success, 2 bad input (one
line on stderr), 1 crash, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from esa.cli import flags
from esa.cli.common import Parser, explicit, guarded, setup_logging
from esa.cli.plan import runner_plan
from esa.config import RunConfig, resume_config, validate
from esa.data import DataSpec
from esa.errors import UsageError
from esa.evaluators import evaluator_options
from esa.evaluators.spec import EvaluationSpec
from esa.experiment import perturbation
from esa.experiment.registry import EXPERIMENTS, experiment_options
from esa.experiment.spec import ExperimentSpec
from esa.metrics.registry import metric_options
from esa.metrics.spec import ScoringSpec
from esa.model.device import DistributedSpec, ModelSpec
from esa.options import spec_options
from esa.outdir.spec import OutputSpec
from esa.superweights.config import SuperWeightSpec

log = logging.getLogger("esa")

GROUP_TITLES = {"quantization": "quantization (instead of --perturb; see README 'Quantization')"}


def build_parser() -> Parser:
    p = Parser(prog=os.path.basename(sys.argv[0]) or "esa_runner.py",
               description="Extreme Sensitivity Analysis: score every weight of a causal LM, perturb the "
                           "Top-K against random_k/bottom_k controls and measure the perplexity change. "
                           "Scores always accumulate in fp32.")
    sections = [
        ("model and runtime", spec_options(ModelSpec)),
        ("large models (see README 'Large models'; data parallel: torchrun --nproc_per_node N)",
         spec_options(DistributedSpec)),
        ("data", spec_options(DataSpec)),
        ("scoring, selection and seeds", spec_options(ScoringSpec) + metric_options()),
        *((GROUP_TITLES.get(n, n), list(EXPERIMENTS[n].options)) for n in EXPERIMENTS),
        ("super weights (Yu et al. 2024; see also scripts/find_super_weights.py)", spec_options(SuperWeightSpec)),
        ("evaluation (every condition is measured by each evaluator)",
         spec_options(EvaluationSpec) + evaluator_options()),
        ("output", spec_options(OutputSpec)),
    ]
    for title, declared in sections:
        flags.add_options(p.add_argument_group(title), declared)
    p._action_groups[-1].add_argument(
        "--resume", default=None, metavar="OUT_DIR", dest="resume_dir",
        help="continue the run in OUT_DIR where it stopped: its configuration (give no other flag that affects "
             "results, or exactly the run's own), its checkpoints (finished seeds, evaluated conditions, super "
             "weights); the model and data must be unchanged (fingerprints)")
    return p


def declared() -> list:
    """Every option of the runner's flags."""
    return [*spec_options(ModelSpec), *spec_options(DistributedSpec), *spec_options(DataSpec),
            *spec_options(ScoringSpec), *metric_options(), *experiment_options(), *spec_options(SuperWeightSpec),
            *spec_options(EvaluationSpec), *evaluator_options(), *spec_options(OutputSpec)]


def config_from_args(argv: list[str]) -> tuple[RunConfig, set[str]]:
    """Parse ``argv`` into a RunConfig (nothing else sees the Namespace) and the names of the typed flags."""
    parser = build_parser()
    vals = flags.values(parser.parse_args(argv))
    given = flags.typed(parser, argv)
    flags.check_requires(declared(), vals, given)
    resume_dir = vals.pop("resume_dir")
    if resume_dir and vals["out_dir"] and Path(vals["out_dir"]) != Path(resume_dir):
        raise UsageError("--resume names the out-dir; give --out-dir only if it is the same folder")
    experiment = perturbation.normalized(flags.options(experiment_options(), vals))
    if experiment.quantize:
        if "controls" in given:
            raise UsageError("--controls applies to --perturb; --quantize compares its own conditions (none, "
                             "protect_topk, protect_random_k, protect_super_weights)")
        experiment = experiment.replace(controls=())
    if experiment.prune or experiment.prune_pattern:
        if "controls" in given:
            raise UsageError("--controls applies to --perturb; --prune compares its own conditions (metric, "
                             "magnitude, random)")
        experiment = experiment.replace(controls=())
    cfg = RunConfig(
        model=flags.spec(ModelSpec, vals, **explicit(given)),
        distributed=flags.spec(DistributedSpec, vals),
        data=flags.spec(DataSpec, vals),
        scoring=flags.spec(ScoringSpec, vals, options=flags.options(metric_options(), vals)),
        experiment=ExperimentSpec(experiment),
        super_weights=flags.spec(SuperWeightSpec, vals),
        evaluation=flags.evaluation(vals, given),
        output=flags.spec(OutputSpec, {**vals, "out_dir": resume_dir or vals["out_dir"]},
                          resume=resume_dir is not None),
    )
    return cfg, given


def resumed(cfg: RunConfig, given: set[str]) -> RunConfig:
    """--resume OUT_DIR: the run's recorded configuration, checked against the flags typed."""
    try:
        recorded = json.loads((Path(cfg.output.out_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume {cfg.output.out_dir!r}: cannot read its config.json ({exc})") from None
    names = flags.flag_names(build_parser())
    typed = {name: names[name] for name in sorted(given) if name in names and name != "resume_dir"}
    return validate(resume_config(cfg, recorded, typed))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        cfg, given = config_from_args(argv)
        cfg = validate(cfg)
        if cfg.output.resume:
            cfg = resumed(cfg, given)
        setup_logging(cfg.output.verbose)
        if cfg.output.dry_run:
            print(runner_plan(cfg))
            return 0
        from esa.runner.pipeline import run  # heavy imports (transformers, matplotlib, scipy) only for a real run

        run(cfg)
        return 0

    return guarded(body, argv, "interrupted (the manifest says so; the model was restored)")

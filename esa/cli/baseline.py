"""Baseline runner: reference perplexity and calibration of the UNMODIFIED model.

For each dataset x context length (x stride): token perplexity, mean NLL, tokens scored, top-1
accuracy, ECE and top-label Brier score, word/byte perplexity and bits per byte (of the text as
one stream; lm-evaluation-harness scores per document), throughput and peak memory.  Token
scoring is ESA runner's own (:func:`esa.model.forward.score_tokens`): the same windows in the same
batches give the same perplexity, bit for bit.  Windows, strides and the metric definitions:
:mod:`esa.baseline.evaluate`.

    python scripts/baseline_runner.py --baseline smoke
    python scripts/baseline_runner.py --datasets wikitext2,notes.txt --context-lens 512,1024 --stride 256

Presets fill in what you do not give: smoke = one dataset, context 256, the first 32 windows;
standard = the whole test text at contexts 512, 1024, 2048; extended = contexts 512 .. 4096, each
non-overlapping and with stride = context/2.  Preset contexts beyond the model's maximum position
are dropped with a warning; an explicit one is an error.

Seeds: the baseline is deterministic (see SEED_SEMANTICS).  Exit codes: 0 success, 2 bad input
(one line on stderr), 1 crash or NaN loss, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from esa.baseline.config import DEFAULT_BATCH_TOKENS, PRESETS, ROW_JOIN_NOTE, BaselineConfig, stride_label
from esa.cli import flags
from esa.cli.common import Parser, explicit, plan_device, tool_main
from esa.data import DATASET_ALIASES, DATASETS, check_text_file
from esa.errors import UsageError
from esa.evaluators import EVALUATORS, evaluator_options
from esa.evaluators.spec import EvaluationSpec, validate_evaluation
from esa.model.device import ModelSpec
from esa.naming import canonical
from esa.options import spec_options
from esa.outdir.layout import default_out_dir, model_slug


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="baseline_runner.py", description=__doc__.split("\n\n")[0])
    declared = spec_options(BaselineConfig)
    flags.add_options(p, declared[:4])  # --model, --device, --dtype, --baseline
    p.add_argument("--datasets", default=None, help=f"comma list of {', '.join(DATASETS)} (test split) and/or "
                   "text file paths (whole file); default: WikiText-2, else the bundled corpus (warning)")
    p.add_argument("--context-lens", default=None, help="comma list of window lengths in tokens")
    p.add_argument("--stride", default=None, help="sliding-window stride in tokens, 'half' (= context/2) or "
                   "'none' (non-overlapping windows); a comma list evaluates each. Default: none")
    flags.add_options(p, [o for o in declared[4:] if o.name == "seeds"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward pass (windows = max(1, tokens // context); "
                        f"default {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows per evaluation")
    flags.add_options(p.add_argument_group("evaluation (the unmodified model's perplexity table; any other evaluator "
                                           "is measured once, on the first dataset's windows at the first context)"),
                      spec_options(EvaluationSpec) + evaluator_options())
    flags.add_options(p, [o for o in declared[4:] if o.name in ("out_dir", "dry_run", "verbose")])
    return p


def _ints(text: str, flag: str, minimum: int) -> tuple[int, ...]:
    parts = [x.strip() for x in text.split(",")]
    if any(not re.fullmatch(r"-?\d+", x) for x in parts):
        raise UsageError(f"{flag} must be a comma-separated list of integers, got {text!r}")
    values = tuple(dict.fromkeys(int(x) for x in parts))  # duplicates dropped, order kept
    if any(v < minimum for v in values):
        raise UsageError(f"{flag} values must be at least {minimum}, got {text!r}")
    return values


def _strides(text: str) -> tuple[int | str | None, ...]:
    out: list[int | str | None] = []
    for part in (x.strip().lower() for x in text.split(",")):
        if part in ("none", "no", "off"):
            item = None
        elif part == "half":
            item = "half"
        elif re.fullmatch(r"-?\d+", part) and int(part) >= 1:
            item = int(part)
        else:
            raise UsageError(f"--stride takes positive integers, 'half' or 'none', got {text!r}")
        if item not in out:
            out.append(item)
    return tuple(out)


def _datasets(text: str) -> tuple[str, ...]:
    out = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            raise UsageError(f"--datasets has an empty item: {text!r}")
        try:
            out.append(canonical(part, DATASETS, DATASET_ALIASES, "dataset"))
            continue
        except UsageError:
            pass
        if not os.path.isfile(part):
            raise UsageError(f"--datasets item {part!r} is neither a dataset ({', '.join(DATASETS)}) nor an "
                             "existing file")
        check_text_file(part, "--datasets file")
        out.append(part)
    return tuple(dict.fromkeys(out))


def config_from_args(argv: list[str]) -> BaselineConfig:
    """Validate every flag that can be checked without the model and apply the preset."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    vals = flags.values(ns)
    given = flags.typed(parser, argv)
    evaluation = flags.evaluation(vals, given)
    validate_evaluation(evaluation)
    preset = PRESETS[ns.preset]
    contexts = _ints(ns.context_lens, "--context-lens", 2) if ns.context_lens is not None else preset["contexts"]
    strides = _strides(ns.stride) if ns.stride is not None else preset["strides"]
    for s in strides:
        if isinstance(s, int) and s > min(contexts):
            raise UsageError(f"--stride {s} exceeds the context length {min(contexts)} (tokens would be skipped)")
    for flag, value in (("--batch-size", ns.batch_size), ("--batch-tokens", ns.batch_tokens),
                        ("--max-windows", ns.max_windows)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    return BaselineConfig(
        **{o.name: vals[o.name] for o in spec_options(ModelSpec)}, **explicit(given),
        preset=ns.preset, evaluation=evaluation,
        datasets=_datasets(ns.datasets) if ns.datasets is not None else (),
        contexts=contexts, contexts_explicit=ns.context_lens is not None, strides=strides,
        max_windows=ns.max_windows if ns.max_windows is not None else preset["max_windows"],
        batch_size=ns.batch_size, batch_tokens=ns.batch_tokens, seeds=ns.seeds,
        out_dir=ns.out_dir, dry_run=ns.dry_run, verbose=ns.verbose)


def default_baseline_dir(cfg: BaselineConfig) -> Path:
    """``outputs/baseline_<model>_<preset>_<timestamp>``."""
    return default_out_dir("baseline", model_slug(cfg.model), cfg.preset)


def plan(cfg: BaselineConfig) -> tuple[str, list[tuple[str, str]], tuple[str, ...]]:
    """The run's plan without loading anything (--dry-run)."""
    choice = plan_device(cfg.device, cfg.device_explicit, cfg.dtype, cfg.dtype_explicit)
    data = ", ".join(cfg.datasets) or "default: WikiText-2 test split if loadable, else the bundled sample corpus"
    batch = (f"{cfg.batch_size} windows" if cfg.batch_size else
             f"{cfg.batch_tokens or DEFAULT_BATCH_TOKENS} tokens (windows = max(1, tokens // context))")
    rows = [("model", cfg.model),
            ("device", f"{choice.device} (requested {cfg.device}), dtype {choice.dtype} (requested {cfg.dtype})"),
            ("preset", cfg.preset), ("datasets", data), ("text", ROW_JOIN_NOTE),
            ("contexts", ", ".join(map(str, cfg.contexts))),
            ("strides", ", ".join(stride_label(s) for s in cfg.strides)),
            ("max windows", f"{cfg.max_windows or 'all'} per evaluation (first windows in text order)"),
            ("batch", f"{batch} per forward pass"),
            ("seeds", f"{', '.join(map(str, cfg.seeds))} (deterministic: identical results for every seed)"),
            ("out dir", str(cfg.out_dir or default_baseline_dir(cfg))),
            ("evaluations", f"{max(1, len(cfg.datasets)) * len(cfg.contexts) * len(cfg.strides)} "
                            "(datasets x contexts x strides)"),
            *([("also", ", ".join(EVALUATORS[n].plan(cfg.evaluation.options) for n in cfg.evaluation.evaluate[1:])
                        + " of the unmodified model, once")] if len(cfg.evaluation.evaluate) > 1 else [])]
    return "baseline plan (dry run: no model is loaded, nothing is written)", rows, choice.warnings


def main(argv: list[str] | None = None) -> int:
    return tool_main(argv, config_from_args, plan, "esa.baseline.run:run", default_baseline_dir)


if __name__ == "__main__":
    sys.exit(main())

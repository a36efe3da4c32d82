#!/usr/bin/env python
"""Find super weights (Yu et al. 2024) in a model's MLP down projections and validate them by ablation.

One forward pass of a prompt (or of calibration text, --detect-on-data) records the max |input|
and |output| of every MLP output projection; a layer whose max |output| is >= --threshold x the
median over layers is a spike, and its largest |w * x| contributor is a candidate super weight.
Candidates are zeroed and the pass repeated until no new spike (or --max-super-weights).  Each
candidate is then zeroed alone, all together, and against as many random weights of the same
matrices, and perplexity is measured on the evaluation windows.  Method: :mod:`esa.superweights`;
ablation and files: :mod:`esa.superweights_report`.

    python scripts/find_super_weights.py --model smollm2-135m --device cpu --data-file wiki.test.raw

Writes OUT_DIR/super_weights.json (everything, including per-layer maxima), super_weights.txt
(the table, also printed), super_weights.png (the spike plot) and experiment_manifest.json.
Exit codes: 0 success (also when no candidate is found), 2 bad input (one line on stderr),
1 crash, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from esa.cli import guarded, start_tool
from esa.config import DEVICES, DTYPES, EMBEDDED_MODEL, UsageError
from esa.superweights import DEFAULT_MAX_SUPER_WEIGHTS, DEFAULT_PROMPT, DEFAULT_THRESHOLD, DETECT_WINDOWS

log = logging.getLogger("esa")


@dataclass(frozen=True)
class SuperWeightConfig:
    """The resolved flags (``*_explicit`` record what the user gave)."""

    model: str = EMBEDDED_MODEL
    device: str = "cuda"
    device_explicit: bool = False
    dtype: str = "bf16"
    dtype_explicit: bool = False
    data_file: str | None = None
    prompt: str = DEFAULT_PROMPT
    detect_on_data: bool = False
    threshold: float = DEFAULT_THRESHOLD
    max_super_weights: int = DEFAULT_MAX_SUPER_WEIGHTS
    eval_samples: int = 16
    max_length: int = 256
    batch_size: int = 4
    seed: int = 0
    out_dir: str | None = None
    dry_run: bool = False
    verbose: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="find_super_weights.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=EMBEDDED_MODEL, help="HF id, model directory, .gguf file or the "
                   f"embedded '{EMBEDDED_MODEL}' (default)")
    p.add_argument("--device", choices=DEVICES, default=None, help="default cuda, else cpu with a warning")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 (fp32 on cpu, with a warning)")
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
    p.add_argument("--out-dir", default=None, help="default outputs/super_weights_<model>_<time>")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit without loading the model")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logs and tracebacks")
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
        if not os.path.isfile(ns.data_file):
            raise UsageError(f"--data-file {ns.data_file!r} does not exist or is not a file")
        if os.path.getsize(ns.data_file) == 0:
            raise UsageError(f"--data-file {ns.data_file!r} is empty")
    return SuperWeightConfig(
        model=ns.model, device=ns.device or "cuda", device_explicit=ns.device is not None, dtype=ns.dtype or "bf16",
        dtype_explicit=ns.dtype is not None, data_file=ns.data_file, prompt=ns.prompt or DEFAULT_PROMPT,
        detect_on_data=ns.detect_on_data, threshold=ns.threshold, max_super_weights=ns.max_super_weights,
        eval_samples=ns.eval_samples, max_length=ns.max_length, batch_size=ns.batch_size, seed=ns.seed,
        out_dir=ns.out_dir, dry_run=ns.dry_run, verbose=ns.verbose)


def default_out_dir(cfg: SuperWeightConfig) -> Path:
    from esa.models import model_slug

    return Path("outputs") / f"super_weights_{model_slug(cfg.model)}{time.strftime('_%Y%m%d-%H%M%S')}"


def print_plan(cfg: SuperWeightConfig) -> None:
    """The run's plan without loading anything (--dry-run)."""
    from esa.models import resolve_device

    try:
        choice = resolve_device(cfg.device, cfg.device_explicit, cfg.dtype, cfg.dtype_explicit)
        device, warnings = f"{choice.device}, dtype {choice.dtype}", list(choice.warnings)
    except UsageError as exc:  # a fact about this machine, not about the configuration
        device, warnings = f"{cfg.device}, dtype {cfg.dtype}", [f"{exc}; a real run on this machine would stop"]
    detect = (f"the first {DETECT_WINDOWS} calibration windows of the data" if cfg.detect_on_data
              else f"the prompt {cfg.prompt!r}")
    lines = ["super-weight plan (dry run: no model is loaded, nothing is written)",
             f"  model:      {cfg.model}",
             f"  device:     {device}",
             f"  detect on:  {detect}",
             f"  rule:       spike = max |down-proj output| >= {cfg.threshold:g}x the median over layers; "
             f"at most {cfg.max_super_weights} candidates",
             f"  data:       {cfg.data_file or 'WikiText-2 test split if loadable, else the bundled sample corpus'}",
             f"  ablation:   {cfg.eval_samples} windows x {cfg.max_length} tokens, batch {cfg.batch_size}, "
             f"random control seed {cfg.seed}",
             f"  out dir:    {cfg.out_dir or default_out_dir(cfg)}"]
    lines += [f"  warning:    {w}" for w in warnings]
    print("\n".join(lines), flush=True)


def run(cfg: SuperWeightConfig) -> int:
    """Load the model and data, detect, ablate, write the files and print the table; the exit code."""
    from esa import models, report
    from esa.data import load_data
    from esa.superweights_report import detection_input, format_table, run_super_weights, write_super_weights

    out_dir, choice, manifest, model, tok = start_tool(Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg),
                                                       cfg.model, cfg.device, cfg.device_explicit, cfg.dtype,
                                                       cfg.dtype_explicit)
    with manifest.recording():
        with manifest.phase("load_data"):
            data = load_data(tok, cfg.data_file, None, cfg.max_length, cfg.eval_samples,
                             DETECT_WINDOWS if cfg.detect_on_data else 0)
        input_ids = detection_input(tok, cfg.prompt, data.calib_pool, cfg.detect_on_data)
        settings = {"model": cfg.model, "model_description": models.describe(model),
                    "detect_on": "data" if cfg.detect_on_data else "prompt",
                    "prompt": None if cfg.detect_on_data else cfg.prompt, "data_source": data.data_source,
                    "bos_policy": data.bos_policy, "eval_samples": cfg.eval_samples, "max_length": cfg.max_length,
                    "device": choice.device, "dtype": choice.dtype, "config": dataclasses.asdict(cfg),
                    "command": sys.argv, "versions": report.versions(), "git_sha": report.git_sha()}
        with manifest.phase("detect_and_ablate"):
            log.info("detecting on %d sequence(s) of %d tokens; ablation on %d windows", input_ids.shape[0],
                     input_ids.shape[1], len(data.eval_windows))
            results = run_super_weights(model, input_ids, data.eval_windows, threshold=cfg.threshold,
                                        max_super_weights=cfg.max_super_weights, batch_size=cfg.batch_size,
                                        seed=cfg.seed, tokenizer=tok, settings=settings)
        for name in write_super_weights(results, out_dir):
            manifest.add_file(name)
        print(format_table(results), flush=True)
        print(f"files: {out_dir}", flush=True)
        manifest.finish("success")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        cfg = config_from_args(build_parser().parse_args(argv))
        if cfg.dry_run:
            print_plan(cfg)
            return 0
        from esa_runner import setup_logging  # one logging setup for every tool

        setup_logging(cfg.verbose)
        return run(cfg)

    return guarded(body, argv, "interrupted (the manifest says so)")


if __name__ == "__main__":
    sys.exit(main())

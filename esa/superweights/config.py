"""The super-weight detector's settings: its defaults, the stand-alone finder's configuration
(built by :mod:`esa.cli.superweights`) and esa_runner's ``--detect-super-weights`` group."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from esa.errors import UsageError
from esa.evaluators.spec import EvaluationSpec
from esa.model.device import ModelSpec
from esa.options import opt, positive

DEFAULT_THRESHOLD = 50.0
DEFAULT_MAX_SUPER_WEIGHTS = 8
DETECT_WINDOWS = 4  # detection on data: the first calibration windows (max over all of them)
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of France."


def _threshold(v: float) -> str | None:
    return None if math.isfinite(v) and v > 1.0 else f"must be a finite number > 1 (a multiple of the median), got {v}"


def _at_least(n: int):
    return lambda v: None if v >= n else f"must be at least {n}, got {v}"


@dataclass(frozen=True)
class SuperWeightConfig(ModelSpec):
    """``scripts/find_super_weights.py``'s resolved flags (``*_explicit`` record what the user gave)."""

    data_file: str | None = opt(None, "text file for the evaluation windows (and --detect-on-data); default: "
                                "WikiText-2 test split if loadable, else the bundled sample corpus")
    prompt: str = opt(DEFAULT_PROMPT, "detection prompt", show_default=repr(DEFAULT_PROMPT))
    detect_on_data: bool = opt(False, f"detect on the first {DETECT_WINDOWS} calibration windows of the data instead "
                               "of the prompt")
    threshold: float = opt(DEFAULT_THRESHOLD, "spike = max |down-proj output| >= this x the median over layers "
                           "(> 1)", check=_threshold)
    max_super_weights: int = opt(DEFAULT_MAX_SUPER_WEIGHTS, "stop the iterative search after this many candidates",
                                 check=_at_least(1))
    eval_samples: int = opt(16, "evaluation windows for the ablation", check=_at_least(1))
    max_length: int = opt(256, "tokens per window", check=_at_least(2))
    batch_size: int = opt(4, "windows per forward pass", check=_at_least(1))
    seed: int = opt(0, "seed of the random-weight control", check=_at_least(0))
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    out_dir: str | None = opt(None, "output directory (default: outputs/super_weights_<model>_<time>)")
    dry_run: bool = opt(False, "validate the configuration, print the plan and exit without loading the model")
    verbose: bool = opt(False, "debug logs and tracebacks", short="-v")


@dataclass(frozen=True)
class SuperWeightSpec:
    """esa_runner's super-weight group: detect, ablate and rank the candidates in each seed's Top-K."""

    detect_super_weights: bool = opt(False, "also find super-weight candidates from activation spikes at every MLP "
                                     "down-projection (one forward pass, iterated), validate them by ablation on the "
                                     "evaluation windows, and report their overlap with the metric's Top-K: "
                                     "super_weights.json/.txt/.png")
    super_weight_threshold: float = opt(DEFAULT_THRESHOLD, "a layer spikes when its max |down-projection output| is "
                                        "this many times the median over layers", check=_threshold)
    max_super_weights: int = opt(DEFAULT_MAX_SUPER_WEIGHTS, "stop the iterative search after this many",
                                 check=positive)
    super_weight_prompt: str | None = opt(None, "detect on this text (default: a neutral sentence)")
    detect_on_data: bool = opt(False, "detect on the first calibration windows instead of a prompt")


def validate_super_weights(spec: SuperWeightSpec) -> None:
    if spec.detect_super_weights:
        if (why := _threshold(spec.super_weight_threshold)) is not None:
            raise UsageError(f"--super-weight-threshold {why}")
        if spec.max_super_weights < 1:
            raise UsageError(f"--max-super-weights must be at least 1, got {spec.max_super_weights}")
        if spec.super_weight_prompt is not None and spec.detect_on_data:
            raise UsageError("give either --super-weight-prompt or --detect-on-data, not both")
        if spec.super_weight_prompt is not None and not spec.super_weight_prompt.strip():
            raise UsageError("--super-weight-prompt is empty")
    elif spec.detect_on_data or spec.super_weight_prompt is not None:
        raise UsageError("--detect-on-data and --super-weight-prompt need --detect-super-weights")
